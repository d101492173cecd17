-- The benchmark's baseline protocol ('direct'): uncoordinated, refused unless
-- the service runs with DTX_ALLOW_UNCOORDINATED=true.
ALTER TABLE orders DROP CONSTRAINT orders_protocol_check;
ALTER TABLE orders ADD CONSTRAINT orders_protocol_check CHECK (protocol IN ('2pc', 'saga', 'direct'));

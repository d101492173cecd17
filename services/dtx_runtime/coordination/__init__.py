"""What the two drivers of global transactions share: the 2PC coordinator and the saga orchestrator.

Bounded participant calls (:mod:`.calls`), the transaction metrics both
export with a ``protocol`` label (:mod:`.metrics`), and the records of
attempts and interventions (:mod:`.records`).
"""

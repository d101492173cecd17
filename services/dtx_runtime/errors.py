"""Every error the runtime raises on purpose, in one place.

Each carries a message meant for a person: the command line prints it as one
line and exits non-zero, rather than showing a traceback.
"""


class DtxError(Exception):
    """Base of the errors dtx raises on purpose."""


class ConfigError(DtxError):
    """A setting is missing or malformed; the message names the variable."""


class MigrationError(DtxError):
    """The migrations on disk and the ones recorded in the database disagree."""


class StartupError(DtxError):
    """A dependency (database, Kafka, a port) was not usable in time."""


class ServiceError(DtxError):
    """A request the service refuses; maps to one gRPC status (see :mod:`dtx_runtime.rpc`).

    Domain code raises these without knowing gRPC; the message names the field
    or the object, e.g. ``items[2].quantity: must be at least 1``.
    """

    code_name = "INTERNAL"


class InvalidArgument(ServiceError):
    code_name = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code_name = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code_name = "UNAVAILABLE"

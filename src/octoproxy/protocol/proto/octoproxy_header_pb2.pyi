from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[Status]
    APPLICATION_ERROR: _ClassVar[Status]
    NO_ROUTE: _ClassVar[Status]
    UNAVAILABLE: _ClassVar[Status]
    TIMEOUT: _ClassVar[Status]
    RATE_LIMITED: _ClassVar[Status]
    UNAUTHENTICATED: _ClassVar[Status]
    PERMISSION_DENIED: _ClassVar[Status]
    PROTOCOL_ERROR: _ClassVar[Status]
    FRAME_TOO_LARGE: _ClassVar[Status]
    OVERLOADED: _ClassVar[Status]
OK: Status
APPLICATION_ERROR: Status
NO_ROUTE: Status
UNAVAILABLE: Status
TIMEOUT: Status
RATE_LIMITED: Status
UNAUTHENTICATED: Status
PERMISSION_DENIED: Status
PROTOCOL_ERROR: Status
FRAME_TOO_LARGE: Status
OVERLOADED: Status

class Header(_message.Message):
    __slots__ = ("service", "method", "caller", "timeout_ms", "status", "error", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    service: str
    method: str
    caller: str
    timeout_ms: int
    status: Status
    error: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, service: _Optional[str] = ..., method: _Optional[str] = ..., caller: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., status: _Optional[_Union[Status, str]] = ..., error: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

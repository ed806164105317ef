from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("server_identity", "caller_identity", "version")
    SERVER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CALLER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    server_identity: str
    caller_identity: str
    version: str
    def __init__(self, server_identity: _Optional[str] = ..., caller_identity: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class WakeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WakeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BuildLogRequest(_message.Message):
    __slots__ = ("build_id", "offset", "follow")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    offset: int
    follow: bool
    def __init__(self, build_id: _Optional[str] = ..., offset: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("offset", "data", "truncated")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    truncated: bool
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., truncated: _Optional[bool] = ...) -> None: ...

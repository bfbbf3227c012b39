from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("manifest_json", "signature", "weights_sha256", "weights_size", "chunk_size")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    manifest_json: bytes
    signature: bytes
    weights_sha256: str
    weights_size: int
    chunk_size: int
    def __init__(self, manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., weights_sha256: _Optional[str] = ..., weights_size: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("offset", "data", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetBatchNormStatsRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class BatchNormLayer(_message.Message):
    __slots__ = ("name", "running_mean", "running_var", "momentum", "eps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    running_mean: _containers.RepeatedScalarFieldContainer[float]
    running_var: _containers.RepeatedScalarFieldContainer[float]
    momentum: float
    eps: float
    def __init__(self, name: _Optional[str] = ..., running_mean: _Optional[_Iterable[float]] = ..., running_var: _Optional[_Iterable[float]] = ..., momentum: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class BatchNormStats(_message.Message):
    __slots__ = ("weights_sha256", "layers")
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    weights_sha256: str
    layers: _containers.RepeatedCompositeFieldContainer[BatchNormLayer]
    def __init__(self, weights_sha256: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[BatchNormLayer, _Mapping]]] = ...) -> None: ...

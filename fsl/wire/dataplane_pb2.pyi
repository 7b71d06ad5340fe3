from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scale", "indices")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: float
    indices: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ..., indices: _Optional[bytes] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("run_id", "round", "client_id", "step", "token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    client_id: str
    step: int
    token: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., step: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("header", "activations", "labels", "want_confidence")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WANT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    labels: Tensor
    want_confidence: bool
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., want_confidence: _Optional[bool] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("grad", "loss", "correct", "server_step", "confidence")
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    loss: float
    correct: int
    server_step: int
    confidence: Tensor
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., correct: _Optional[int] = ..., server_step: _Optional[int] = ..., confidence: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("header", "activations", "budget_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    budget_ms: float
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., budget_ms: _Optional[float] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("logits", "queue_ms", "compute_ms", "batch")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    queue_ms: float
    compute_ms: float
    batch: int
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("header", "activations")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("activations",)
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    activations: Tensor
    def __init__(self, activations: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("header", "grad", "forward_step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    grad: Tensor
    forward_step: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., forward_step: _Optional[int] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad", "server_step")
    GRAD_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    server_step: int
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ..., server_step: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model", "cut", "sample_shape", "dtypes", "max_batch", "max_message_bytes", "device", "mode", "ushaped")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    USHAPED_FIELD_NUMBER: _ClassVar[int]
    model: str
    cut: str
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    max_message_bytes: int
    device: str
    mode: str
    ushaped: bool
    def __init__(self, model: _Optional[str] = ..., cut: _Optional[str] = ..., sample_shape: _Optional[_Iterable[int]] = ..., dtypes: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device: _Optional[str] = ..., mode: _Optional[str] = ..., ushaped: _Optional[bool] = ...) -> None: ...

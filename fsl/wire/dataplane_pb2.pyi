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
    __slots__ = ("header", "activations", "labels", "want_confidence", "tensors", "label_counts")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WANT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    labels: Tensor
    want_confidence: bool
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., want_confidence: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., label_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("grad", "loss", "correct", "server_step", "confidence", "grads")
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    loss: float
    correct: int
    server_step: int
    confidence: Tensor
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., correct: _Optional[int] = ..., server_step: _Optional[int] = ..., confidence: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("header", "activations", "budget_ms", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    budget_ms: float
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., budget_ms: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("logits", "queue_ms", "compute_ms", "batch", "outputs")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    queue_ms: float
    compute_ms: float
    batch: int
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("header", "activations", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    activations: Tensor
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("activations", "tensors")
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    activations: Tensor
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, activations: _Optional[_Union[Tensor, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("header", "grad", "forward_step", "grads")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_STEP_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    grad: Tensor
    forward_step: int
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., forward_step: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad", "server_step", "grads")
    GRAD_FIELD_NUMBER: _ClassVar[int]
    SERVER_STEP_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    server_step: int
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ..., server_step: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model", "cut", "sample_shape", "dtypes", "max_batch", "max_message_bytes", "device", "mode", "ushaped", "signature", "bounds", "task")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    USHAPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    model: str
    cut: str
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    max_message_bytes: int
    device: str
    mode: str
    ushaped: bool
    signature: _containers.RepeatedCompositeFieldContainer[CutTensor]
    bounds: _containers.RepeatedCompositeFieldContainer[SizeBound]
    task: str
    def __init__(self, model: _Optional[str] = ..., cut: _Optional[str] = ..., sample_shape: _Optional[_Iterable[int]] = ..., dtypes: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device: _Optional[str] = ..., mode: _Optional[str] = ..., ushaped: _Optional[bool] = ..., signature: _Optional[_Iterable[_Union[CutTensor, _Mapping]]] = ..., bounds: _Optional[_Iterable[_Union[SizeBound, _Mapping]]] = ..., task: _Optional[str] = ...) -> None: ...

class CutTensor(_message.Message):
    __slots__ = ("name", "dtype", "dims", "grad")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    dims: _containers.RepeatedScalarFieldContainer[str]
    grad: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., dims: _Optional[_Iterable[str]] = ..., grad: _Optional[bool] = ...) -> None: ...

class SizeBound(_message.Message):
    __slots__ = ("name", "low", "high")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    name: str
    low: int
    high: int
    def __init__(self, name: _Optional[str] = ..., low: _Optional[int] = ..., high: _Optional[int] = ...) -> None: ...

class ControlHeader(_message.Message):
    __slots__ = ("run_id", "round", "token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    token: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClientGrant(_message.Message):
    __slots__ = ("client_id", "token", "replica")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    replica: str
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class LoadSegmentRequest(_message.Message):
    __slots__ = ("header", "experiment", "input_shape", "num_classes", "state", "clients", "base_digest")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    header: ControlHeader
    experiment: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    state: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    clients: _containers.RepeatedCompositeFieldContainer[ClientGrant]
    base_digest: str
    def __init__(self, header: _Optional[_Union[ControlHeader, _Mapping]] = ..., experiment: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., state: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., clients: _Optional[_Iterable[_Union[ClientGrant, _Mapping]]] = ..., base_digest: _Optional[str] = ...) -> None: ...

class LoadSegmentReply(_message.Message):
    __slots__ = ("device", "replicas")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    device: str
    replicas: int
    def __init__(self, device: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class SegmentStateRequest(_message.Message):
    __slots__ = ("header", "tensors", "close")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    header: ControlHeader
    tensors: bool
    close: bool
    def __init__(self, header: _Optional[_Union[ControlHeader, _Mapping]] = ..., tensors: _Optional[bool] = ..., close: _Optional[bool] = ...) -> None: ...

class ClientTraffic(_message.Message):
    __slots__ = ("client_id", "bytes_up", "bytes_down", "train_requests", "infer_requests", "samples")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    TRAIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFER_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    bytes_up: int
    bytes_down: int
    train_requests: int
    infer_requests: int
    samples: int
    def __init__(self, client_id: _Optional[str] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., train_requests: _Optional[int] = ..., infer_requests: _Optional[int] = ..., samples: _Optional[int] = ...) -> None: ...

class SegmentStateReply(_message.Message):
    __slots__ = ("state", "samples", "steps", "traffic")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    state: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    samples: int
    steps: int
    traffic: _containers.RepeatedCompositeFieldContainer[ClientTraffic]
    def __init__(self, state: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., samples: _Optional[int] = ..., steps: _Optional[int] = ..., traffic: _Optional[_Iterable[_Union[ClientTraffic, _Mapping]]] = ...) -> None: ...

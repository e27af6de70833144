from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_VIDEO: _ClassVar[Modality]
    MODALITY_TEXT_IMAGE: _ClassVar[Modality]

class OutputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_TYPE_UNSPECIFIED: _ClassVar[OutputType]
    OUTPUT_TYPE_FLOAT32: _ClassVar[OutputType]
    OUTPUT_TYPE_FLOAT16: _ClassVar[OutputType]
    OUTPUT_TYPE_INT8: _ClassVar[OutputType]
    OUTPUT_TYPE_UINT8: _ClassVar[OutputType]
    OUTPUT_TYPE_BINARY: _ClassVar[OutputType]
    OUTPUT_TYPE_UBINARY: _ClassVar[OutputType]

class RerankMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERANK_METHOD_UNSPECIFIED: _ClassVar[RerankMethod]
    RERANK_METHOD_VENDOR: _ClassVar[RerankMethod]
    RERANK_METHOD_EMBEDDING_COSINE: _ClassVar[RerankMethod]

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNSPECIFIED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_IN_SERVICE: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_PROBING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_OUT_OF_SERVICE: _ClassVar[DeploymentState]
MODALITY_UNSPECIFIED: Modality
MODALITY_TEXT: Modality
MODALITY_IMAGE: Modality
MODALITY_VIDEO: Modality
MODALITY_TEXT_IMAGE: Modality
OUTPUT_TYPE_UNSPECIFIED: OutputType
OUTPUT_TYPE_FLOAT32: OutputType
OUTPUT_TYPE_FLOAT16: OutputType
OUTPUT_TYPE_INT8: OutputType
OUTPUT_TYPE_UINT8: OutputType
OUTPUT_TYPE_BINARY: OutputType
OUTPUT_TYPE_UBINARY: OutputType
RERANK_METHOD_UNSPECIFIED: RerankMethod
RERANK_METHOD_VENDOR: RerankMethod
RERANK_METHOD_EMBEDDING_COSINE: RerankMethod
DEPLOYMENT_STATE_UNSPECIFIED: DeploymentState
DEPLOYMENT_STATE_IN_SERVICE: DeploymentState
DEPLOYMENT_STATE_PROBING: DeploymentState
DEPLOYMENT_STATE_OUT_OF_SERVICE: DeploymentState

class Image(_message.Message):
    __slots__ = ("uri", "data", "mime_type")
    URI_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    data: bytes
    mime_type: str
    def __init__(self, uri: _Optional[str] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, frames: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class TextImage(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("text", "image", "video", "text_image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    TEXT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    video: Video
    text_image: TextImage
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., video: _Optional[_Union[Video, _Mapping]] = ..., text_image: _Optional[_Union[TextImage, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "instruction", "dimensions", "normalize", "request_id", "user", "output_type", "no_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    instruction: str
    dimensions: int
    normalize: bool
    request_id: str
    user: str
    output_type: OutputType
    no_cache: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., instruction: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., request_id: _Optional[str] = ..., user: _Optional[str] = ..., output_type: _Optional[_Union[OutputType, str]] = ..., no_cache: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("index", "values", "data", "cached")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    index: int
    values: _containers.RepeatedScalarFieldContainer[float]
    data: bytes
    cached: bool
    def __init__(self, index: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., data: _Optional[bytes] = ..., cached: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "embeddings", "usage", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: Usage
    request_id: str
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamEmbedRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: EmbedRequest
    def __init__(self, request: _Optional[_Union[EmbedRequest, _Mapping]] = ...) -> None: ...

class StreamEmbedResponse(_message.Message):
    __slots__ = ("index", "embedding", "error", "model", "usage", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    embedding: Embedding
    error: _status_pb2.Status
    model: str
    usage: Usage
    request_id: str
    def __init__(self, index: _Optional[int] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EmbedPipelineRequest(_message.Message):
    __slots__ = ("correlation_id", "request")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    request: EmbedRequest
    def __init__(self, correlation_id: _Optional[str] = ..., request: _Optional[_Union[EmbedRequest, _Mapping]] = ...) -> None: ...

class EmbedPipelineResponse(_message.Message):
    __slots__ = ("correlation_id", "response", "error")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    response: EmbedResponse
    error: _status_pb2.Status
    def __init__(self, correlation_id: _Optional[str] = ..., response: _Optional[_Union[EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("model", "query", "documents", "top_n", "return_documents", "request_id", "user", "document_inputs", "no_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_INPUTS_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    return_documents: bool
    request_id: str
    user: str
    document_inputs: _containers.RepeatedCompositeFieldContainer[Input]
    no_cache: bool
    def __init__(self, model: _Optional[str] = ..., query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., request_id: _Optional[str] = ..., user: _Optional[str] = ..., document_inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., no_cache: _Optional[bool] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "relevance_score", "document", "document_input", "cached")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_INPUT_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    index: int
    relevance_score: float
    document: str
    document_input: Input
    cached: bool
    def __init__(self, index: _Optional[int] = ..., relevance_score: _Optional[float] = ..., document: _Optional[str] = ..., document_input: _Optional[_Union[Input, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("model", "results", "usage", "request_id", "method", "query_cached")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    QUERY_CACHED_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    usage: Usage
    request_id: str
    method: RerankMethod
    query_cached: bool
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ..., method: _Optional[_Union[RerankMethod, str]] = ..., query_cached: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "provider", "modalities", "max_inputs_per_call", "default_dimensions", "allowed_dimensions", "min_dimensions", "max_dimensions", "embeds", "reranks", "accepts_instruction", "max_text_chars", "space", "deployments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDS_FIELD_NUMBER: _ClassVar[int]
    RERANKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    modalities: _containers.RepeatedScalarFieldContainer[Modality]
    max_inputs_per_call: int
    default_dimensions: int
    allowed_dimensions: _containers.RepeatedScalarFieldContainer[int]
    min_dimensions: int
    max_dimensions: int
    embeds: bool
    reranks: bool
    accepts_instruction: bool
    max_text_chars: int
    space: str
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., max_inputs_per_call: _Optional[int] = ..., default_dimensions: _Optional[int] = ..., allowed_dimensions: _Optional[_Iterable[int]] = ..., min_dimensions: _Optional[int] = ..., max_dimensions: _Optional[int] = ..., embeds: _Optional[bool] = ..., reranks: _Optional[bool] = ..., accepts_instruction: _Optional[bool] = ..., max_text_chars: _Optional[int] = ..., space: _Optional[str] = ..., deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "provider", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    state: DeploymentState
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., state: _Optional[_Union[DeploymentState, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

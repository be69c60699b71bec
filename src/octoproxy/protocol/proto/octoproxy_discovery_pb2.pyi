from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("address", "weight", "region", "idc", "tags", "status", "warmup_start_unix_ms", "center", "role", "warmup_window_ms")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HEALTHY: _ClassVar[Endpoint.Status]
        STARTING: _ClassVar[Endpoint.Status]
        STOPPING: _ClassVar[Endpoint.Status]
        UNHEALTHY: _ClassVar[Endpoint.Status]
    HEALTHY: Endpoint.Status
    STARTING: Endpoint.Status
    STOPPING: Endpoint.Status
    UNHEALTHY: Endpoint.Status
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NORMAL: _ClassVar[Endpoint.Role]
        BACKUP: _ClassVar[Endpoint.Role]
    NORMAL: Endpoint.Role
    BACKUP: Endpoint.Role
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    IDC_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: int
    region: str
    idc: str
    tags: _containers.ScalarMap[str, str]
    status: Endpoint.Status
    warmup_start_unix_ms: int
    center: str
    role: Endpoint.Role
    warmup_window_ms: int
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., region: _Optional[str] = ..., idc: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., status: _Optional[_Union[Endpoint.Status, str]] = ..., warmup_start_unix_ms: _Optional[int] = ..., center: _Optional[str] = ..., role: _Optional[_Union[Endpoint.Role, str]] = ..., warmup_window_ms: _Optional[int] = ...) -> None: ...

class ClusterLoadAssignment(_message.Message):
    __slots__ = ("service", "endpoints")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, service: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class RouteRule(_message.Message):
    __slots__ = ("name", "method", "match_metadata", "endpoint_tags", "timeout_ms", "weight_overrides", "fallback_to_all")
    class MatchMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EndpointTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class WeightOverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MATCH_METADATA_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_TAGS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_TO_ALL_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    match_metadata: _containers.ScalarMap[str, str]
    endpoint_tags: _containers.ScalarMap[str, str]
    timeout_ms: int
    weight_overrides: _containers.ScalarMap[str, int]
    fallback_to_all: bool
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., match_metadata: _Optional[_Mapping[str, str]] = ..., endpoint_tags: _Optional[_Mapping[str, str]] = ..., timeout_ms: _Optional[int] = ..., weight_overrides: _Optional[_Mapping[str, int]] = ..., fallback_to_all: _Optional[bool] = ...) -> None: ...

class RouteRules(_message.Message):
    __slots__ = ("service", "rules")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    service: str
    rules: _containers.RepeatedCompositeFieldContainer[RouteRule]
    def __init__(self, service: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[RouteRule, _Mapping]]] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("name", "version", "body")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    body: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DiscoveryRequest(_message.Message):
    __slots__ = ("node_id", "type_url", "subscribe", "unsubscribe", "initial_resource_versions", "response_nonce", "error_detail")
    class InitialResourceVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_RESOURCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_NONCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    type_url: str
    subscribe: _containers.RepeatedScalarFieldContainer[str]
    unsubscribe: _containers.RepeatedScalarFieldContainer[str]
    initial_resource_versions: _containers.ScalarMap[str, str]
    response_nonce: str
    error_detail: ErrorDetail
    def __init__(self, node_id: _Optional[str] = ..., type_url: _Optional[str] = ..., subscribe: _Optional[_Iterable[str]] = ..., unsubscribe: _Optional[_Iterable[str]] = ..., initial_resource_versions: _Optional[_Mapping[str, str]] = ..., response_nonce: _Optional[str] = ..., error_detail: _Optional[_Union[ErrorDetail, _Mapping]] = ...) -> None: ...

class DiscoveryResponse(_message.Message):
    __slots__ = ("type_url", "nonce", "system_version", "resources", "removed_resources")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    nonce: str
    system_version: str
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    removed_resources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, type_url: _Optional[str] = ..., nonce: _Optional[str] = ..., system_version: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., removed_resources: _Optional[_Iterable[str]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("request_id", "service", "endpoint", "lease_ttl_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    service: str
    endpoint: Endpoint
    lease_ttl_ms: int
    def __init__(self, request_id: _Optional[int] = ..., service: _Optional[str] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class Deregister(_message.Message):
    __slots__ = ("request_id", "service", "address")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    service: str
    address: str
    def __init__(self, request_id: _Optional[int] = ..., service: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class SetStatus(_message.Message):
    __slots__ = ("request_id", "service", "address", "status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    service: str
    address: str
    status: Endpoint.Status
    def __init__(self, request_id: _Optional[int] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[Endpoint.Status, str]] = ...) -> None: ...

class LeaseKeepAlive(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutRouteRules(_message.Message):
    __slots__ = ("request_id", "rules")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    rules: RouteRules
    def __init__(self, request_id: _Optional[int] = ..., rules: _Optional[_Union[RouteRules, _Mapping]] = ...) -> None: ...

class RegisterAck(_message.Message):
    __slots__ = ("request_id", "error", "lease_ttl_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    error: str
    lease_ttl_ms: int
    def __init__(self, request_id: _Optional[int] = ..., error: _Optional[str] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("discovery", "register", "deregister", "set_status", "keepalive", "put_route_rules", "certificate_request")
    DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    DEREGISTER_FIELD_NUMBER: _ClassVar[int]
    SET_STATUS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    PUT_ROUTE_RULES_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    discovery: DiscoveryRequest
    register: Register
    deregister: Deregister
    set_status: SetStatus
    keepalive: LeaseKeepAlive
    put_route_rules: PutRouteRules
    certificate_request: CertificateRequest
    def __init__(self, discovery: _Optional[_Union[DiscoveryRequest, _Mapping]] = ..., register: _Optional[_Union[Register, _Mapping]] = ..., deregister: _Optional[_Union[Deregister, _Mapping]] = ..., set_status: _Optional[_Union[SetStatus, _Mapping]] = ..., keepalive: _Optional[_Union[LeaseKeepAlive, _Mapping]] = ..., put_route_rules: _Optional[_Union[PutRouteRules, _Mapping]] = ..., certificate_request: _Optional[_Union[CertificateRequest, _Mapping]] = ...) -> None: ...

class CertificateRequest(_message.Message):
    __slots__ = ("request_id", "csr_pem")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    csr_pem: str
    def __init__(self, request_id: _Optional[int] = ..., csr_pem: _Optional[str] = ...) -> None: ...

class CertificateResponse(_message.Message):
    __slots__ = ("request_id", "error", "certificate_chain_pem", "trust_bundle_pem", "not_after_unix_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    error: str
    certificate_chain_pem: str
    trust_bundle_pem: str
    not_after_unix_ms: int
    def __init__(self, request_id: _Optional[int] = ..., error: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., trust_bundle_pem: _Optional[str] = ..., not_after_unix_ms: _Optional[int] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("response", "ack", "certificate")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    response: DiscoveryResponse
    ack: RegisterAck
    certificate: CertificateResponse
    def __init__(self, response: _Optional[_Union[DiscoveryResponse, _Mapping]] = ..., ack: _Optional[_Union[RegisterAck, _Mapping]] = ..., certificate: _Optional[_Union[CertificateResponse, _Mapping]] = ...) -> None: ...

class StoreSnapshot(_message.Message):
    __slots__ = ("registrations", "routes", "tokens", "app_configs", "authz", "governance")
    class Registration(_message.Message):
        __slots__ = ("service", "endpoint", "lease_ttl_ms")
        SERVICE_FIELD_NUMBER: _ClassVar[int]
        ENDPOINT_FIELD_NUMBER: _ClassVar[int]
        LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
        service: str
        endpoint: Endpoint
        lease_ttl_ms: int
        def __init__(self, service: _Optional[str] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    APP_CONFIGS_FIELD_NUMBER: _ClassVar[int]
    AUTHZ_FIELD_NUMBER: _ClassVar[int]
    GOVERNANCE_FIELD_NUMBER: _ClassVar[int]
    registrations: _containers.RepeatedCompositeFieldContainer[StoreSnapshot.Registration]
    routes: _containers.RepeatedCompositeFieldContainer[RouteRules]
    tokens: _containers.RepeatedCompositeFieldContainer[JoinToken]
    app_configs: _containers.RepeatedCompositeFieldContainer[AppConfigRecord]
    authz: _containers.RepeatedCompositeFieldContainer[AuthorizationPolicy]
    governance: _containers.RepeatedCompositeFieldContainer[GovernancePolicyRecord]
    def __init__(self, registrations: _Optional[_Iterable[_Union[StoreSnapshot.Registration, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[RouteRules, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[JoinToken, _Mapping]]] = ..., app_configs: _Optional[_Iterable[_Union[AppConfigRecord, _Mapping]]] = ..., authz: _Optional[_Iterable[_Union[AuthorizationPolicy, _Mapping]]] = ..., governance: _Optional[_Iterable[_Union[GovernancePolicyRecord, _Mapping]]] = ...) -> None: ...

class JoinToken(_message.Message):
    __slots__ = ("id", "service", "sha256_hex", "created_unix_ms", "expires_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SHA256_HEX_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    service: str
    sha256_hex: str
    created_unix_ms: int
    expires_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., service: _Optional[str] = ..., sha256_hex: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class AppConfig(_message.Message):
    __slots__ = ("service", "environment", "version", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    service: str
    environment: str
    version: str
    values: _containers.ScalarMap[str, str]
    def __init__(self, service: _Optional[str] = ..., environment: _Optional[str] = ..., version: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AppConfigVersion(_message.Message):
    __slots__ = ("version", "values", "created_unix_ms", "note")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    version: int
    values: _containers.ScalarMap[str, str]
    created_unix_ms: int
    note: str
    def __init__(self, version: _Optional[int] = ..., values: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class AppConfigRecord(_message.Message):
    __slots__ = ("service", "environment", "history", "stable", "candidate", "percent", "last_version")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    LAST_VERSION_FIELD_NUMBER: _ClassVar[int]
    service: str
    environment: str
    history: _containers.RepeatedCompositeFieldContainer[AppConfigVersion]
    stable: int
    candidate: int
    percent: int
    last_version: int
    def __init__(self, service: _Optional[str] = ..., environment: _Optional[str] = ..., history: _Optional[_Iterable[_Union[AppConfigVersion, _Mapping]]] = ..., stable: _Optional[int] = ..., candidate: _Optional[int] = ..., percent: _Optional[int] = ..., last_version: _Optional[int] = ...) -> None: ...

class AuthorizationRule(_message.Message):
    __slots__ = ("action", "callers", "methods")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CALLERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    action: str
    callers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[str] = ..., callers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

class AuthorizationPolicy(_message.Message):
    __slots__ = ("service", "default_action", "rules")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ACTION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    service: str
    default_action: str
    rules: _containers.RepeatedCompositeFieldContainer[AuthorizationRule]
    def __init__(self, service: _Optional[str] = ..., default_action: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[AuthorizationRule, _Mapping]]] = ...) -> None: ...

class GovernancePolicy(_message.Message):
    __slots__ = ("service", "version", "policy_json")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: int
    policy_json: str
    def __init__(self, service: _Optional[str] = ..., version: _Optional[int] = ..., policy_json: _Optional[str] = ...) -> None: ...

class GovernancePolicyVersion(_message.Message):
    __slots__ = ("version", "policy_json", "created_unix_ms", "note")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    version: int
    policy_json: str
    created_unix_ms: int
    note: str
    def __init__(self, version: _Optional[int] = ..., policy_json: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class GovernancePolicyRecord(_message.Message):
    __slots__ = ("service", "history", "current", "last_version")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LAST_VERSION_FIELD_NUMBER: _ClassVar[int]
    service: str
    history: _containers.RepeatedCompositeFieldContainer[GovernancePolicyVersion]
    current: int
    last_version: int
    def __init__(self, service: _Optional[str] = ..., history: _Optional[_Iterable[_Union[GovernancePolicyVersion, _Mapping]]] = ..., current: _Optional[int] = ..., last_version: _Optional[int] = ...) -> None: ...

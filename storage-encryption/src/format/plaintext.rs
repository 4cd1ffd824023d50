//! What an unencrypted (identity) value holds: Kubernetes protobuf
//! (`k8s\0` + `runtime.Unknown`), JSON (custom resources), CBOR, or something else.

use serde::Deserialize;

/// Magic of kube-apiserver's protobuf encoding.
pub const PROTOBUF_MAGIC: &[u8] = b"k8s\x00";
/// Self-described CBOR tag 55799 as kube-apiserver writes it.
pub const CBOR_MAGIC: &[u8] = &[0xd9, 0xd9, 0xf7];

/// `apiVersion` and `kind` of a stored object, when they could be read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TypeMeta {
    /// e.g. `v1`, `apps/v1`.
    pub api_version: String,
    /// e.g. `Secret`.
    pub kind: String,
}

/// The encoding of a plaintext value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaintextKind {
    /// `k8s\0` protobuf; `type_meta` from the `runtime.Unknown` envelope if it decodes.
    Protobuf {
        /// apiVersion/kind from the envelope.
        type_meta: Option<TypeMeta>,
    },
    /// A JSON object; `type_meta` if it parses and has them.
    Json {
        /// apiVersion/kind from the object.
        type_meta: Option<TypeMeta>,
    },
    /// CBOR starting with the self-describe tag `d9 d9 f7`.
    Cbor,
    /// Anything else (not a Kubernetes object encoding).
    Other,
}

impl PlaintextKind {
    /// `protobuf`, `json`, `cbor` or `other`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Protobuf { .. } => "protobuf",
            Self::Json { .. } => "json",
            Self::Cbor => "cbor",
            Self::Other => "other",
        }
    }

    /// The apiVersion/kind, if known.
    pub fn type_meta(&self) -> Option<&TypeMeta> {
        match self {
            Self::Protobuf { type_meta } | Self::Json { type_meta } => type_meta.as_ref(),
            Self::Cbor | Self::Other => None,
        }
    }
}

/// The `runtime.Unknown` envelope, only the field we read (prost skips the others).
#[derive(Clone, PartialEq, prost::Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<UnknownTypeMeta>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UnknownTypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonTypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Classifies a value that carries no `k8s:enc:` prefix.
pub fn classify(value: &[u8]) -> PlaintextKind {
    if let Some(body) = value.strip_prefix(PROTOBUF_MAGIC) {
        let type_meta = <Unknown as prost::Message>::decode(body)
            .ok()
            .and_then(|u| u.type_meta)
            .map(|t| TypeMeta {
                api_version: t.api_version.unwrap_or_default(),
                kind: t.kind.unwrap_or_default(),
            });
        return PlaintextKind::Protobuf { type_meta };
    }
    if value.starts_with(CBOR_MAGIC) {
        return PlaintextKind::Cbor;
    }
    let trimmed = value.trim_ascii_start();
    if trimmed.first() == Some(&b'{') {
        return match serde_json::from_slice::<JsonTypeMeta>(value) {
            Ok(meta) => PlaintextKind::Json {
                type_meta: match (meta.api_version, meta.kind) {
                    (None, None) => None,
                    (a, k) => Some(TypeMeta {
                        api_version: a.unwrap_or_default(),
                        kind: k.unwrap_or_default(),
                    }),
                },
            },
            Err(_) => PlaintextKind::Other,
        };
    }
    PlaintextKind::Other
}

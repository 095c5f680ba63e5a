//! The last-known-good dynamic config: the xDS resources of the last
//! complete config applied, kept in the state directory so that a proxy
//! restarted while the control plane is unreachable can serve what it
//! served before.
//!
//! The file holds the resources as the control plane sent them (encoded
//! Envoy protos), not the translated model: a replay goes through the same
//! translation and validation as a live update. Secrets are never saved:
//! private keys stay in memory.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use postern_proto::google::protobuf::Any;
use postern_proto::type_url;
use postern_xds::Resource;
use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE_NAME: &str = "xds-last-known-good.json";

/// Bumped when the file's layout changes; other layouts are not read.
const FORMAT: u32 = 1;

/// Types in the order a replay applies them: clusters before the
/// endpoints that warm them, listeners before their routes.
pub const REPLAY_ORDER: [&str; 4] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
];

/// Accepted resources by type URL, then by name.
pub type RawResources = BTreeMap<&'static str, BTreeMap<String, Resource>>;

/// The saved config could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum LastKnownGoodError {
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the file (or renaming it into place) failed.
    #[error("cannot save the last-known-good config to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is not one this version wrote.
    #[error("{path} is not a usable last-known-good config: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file belongs to another node (a state directory shared by
    /// mistake, or a pod with a new identity).
    #[error("{path} was saved by node {saved:?}, not {ours:?}; not used")]
    OtherNode {
        /// The file.
        path: PathBuf,
        /// Its node id.
        saved: String,
        /// Ours.
        ours: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFile {
    format: u32,
    node: String,
    /// Seconds since the Unix epoch.
    saved_at: u64,
    types: BTreeMap<String, Vec<SavedResource>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedResource {
    name: String,
    version: String,
    /// The encoded resource, base64.
    body: String,
}

/// A saved config, ready to replay.
#[derive(Debug)]
pub struct Saved {
    /// When it was saved.
    pub saved_at: SystemTime,
    /// Resources by type, in `REPLAY_ORDER`.
    pub types: Vec<(&'static str, Vec<Resource>)>,
}

/// Where one node's last-known-good config lives.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    node: String,
}

impl Store {
    /// The store in `dir` for the node `node`.
    pub fn new(dir: &Path, node: &str) -> Store {
        Store {
            path: dir.join(FILE_NAME),
            node: node.to_string(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the saved config with `resources`. The file is written
    /// aside and renamed into place, so a crash never leaves half a file.
    pub fn save(&self, resources: &RawResources) -> Result<(), LastKnownGoodError> {
        let engine = base64::engine::general_purpose::STANDARD;
        let types = resources
            .iter()
            .filter(|(kind, _)| REPLAY_ORDER.contains(kind))
            .map(|(kind, table)| {
                let list = table
                    .values()
                    .map(|r| SavedResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        body: engine.encode(&r.body.value),
                    })
                    .collect();
                (kind.to_string(), list)
            })
            .collect();
        let file = SavedFile {
            format: FORMAT,
            node: self.node.clone(),
            saved_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            types,
        };
        let write_err = |source| LastKnownGoodError::Write {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_vec(&file).map_err(|e| write_err(io::Error::other(e)))?;
        let aside = self.path.with_extension("json.tmp");
        std::fs::write(&aside, body).map_err(write_err)?;
        std::fs::rename(&aside, &self.path).map_err(write_err)
    }

    /// The saved config, or `None` when there is none.
    pub fn load(&self) -> Result<Option<Saved>, LastKnownGoodError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LastKnownGoodError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let invalid = |reason: String| LastKnownGoodError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let file: SavedFile = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        if file.format != FORMAT {
            return Err(invalid(format!(
                "format {} (expected {FORMAT})",
                file.format
            )));
        }
        if file.node != self.node {
            return Err(LastKnownGoodError::OtherNode {
                path: self.path.clone(),
                saved: file.node,
                ours: self.node.clone(),
            });
        }
        let engine = base64::engine::general_purpose::STANDARD;
        let mut types = Vec::new();
        for kind in REPLAY_ORDER {
            let Some(list) = file.types.get(kind) else {
                continue;
            };
            let mut resources = Vec::with_capacity(list.len());
            for saved in list {
                let value = engine
                    .decode(&saved.body)
                    .map_err(|e| invalid(format!("{kind} {}: {e}", saved.name)))?;
                resources.push(Resource {
                    name: saved.name.clone(),
                    version: saved.version.clone(),
                    body: Any {
                        type_url: kind.to_string(),
                        value,
                    },
                });
            }
            types.push((kind, resources));
        }
        if let Some(unknown) = file
            .types
            .keys()
            .find(|k| !REPLAY_ORDER.contains(&k.as_str()))
        {
            return Err(invalid(format!("unexpected resource type {unknown}")));
        }
        Ok(Some(Saved {
            saved_at: SystemTime::UNIX_EPOCH + Duration::from_secs(file.saved_at),
            types,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn resource(kind: &str, name: &str, value: &[u8]) -> Resource {
        Resource {
            name: name.into(),
            version: "v7".into(),
            body: Any {
                type_url: kind.into(),
                value: value.to_vec(),
            },
        }
    }

    #[test]
    fn saved_resources_come_back_in_replay_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(
            dir.path(),
            "sidecar~10.0.0.5~web.shop~shop.svc.cluster.local",
        );
        assert!(store.load().unwrap().is_none());
        let mut raw = RawResources::new();
        for (kind, name, value) in [
            (type_url::ROUTE, "r", &b"\x0a\x01r"[..]),
            (type_url::LISTENER, "l", b"\x0a\x01l"),
            (type_url::CLUSTER, "c", b"\x0a\x01c"),
        ] {
            raw.entry(kind)
                .or_default()
                .insert(name.into(), resource(kind, name, value));
        }
        store.save(&raw).unwrap();
        let saved = store.load().unwrap().unwrap();
        let order: Vec<&str> = saved.types.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(
            order,
            [type_url::CLUSTER, type_url::LISTENER, type_url::ROUTE]
        );
        assert_eq!(
            saved.types[2].1,
            vec![resource(type_url::ROUTE, "r", b"\x0a\x01r")]
        );
        assert!(saved.saved_at.elapsed().unwrap() < Duration::from_secs(60));
        assert!(!dir.path().join("xds-last-known-good.json.tmp").exists());
    }

    #[test]
    fn another_nodes_or_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Store::new(dir.path(), "a")
            .save(&RawResources::new())
            .unwrap();
        let err = Store::new(dir.path(), "b").load().unwrap_err();
        assert!(matches!(err, LastKnownGoodError::OtherNode { .. }), "{err}");
        std::fs::write(dir.path().join(FILE_NAME), "{").unwrap();
        let err = Store::new(dir.path(), "a").load().unwrap_err();
        assert!(matches!(err, LastKnownGoodError::Invalid { .. }), "{err}");
    }
}

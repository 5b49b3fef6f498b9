//! Registered local models: manifests persisted in sled, mirrored into the runtime's
//! [`ModelPool`].
//!
//! Owns the `local_models` tree (name -> manifest JSON) and the start-up sequence:
//! read every manifest, register the models `[local.models]` declares when they are
//! missing or registered from another path, then preload. The CLI uses the same
//! [`Registry`] when it opens the store directly (no server running).
//!
//! Invariants: a manifest is in the tree (flushed) before the pool serves it, and out
//! of the tree before the pool forgets it, so a restart never serves a model the admin
//! removed; registration hashes the files outside any lock the serving path takes.

use std::path::Path;
use std::sync::Arc;

use airlock_runtime::models::{ComputeDevice, LoadOptions};
use airlock_runtime::{Manifest, ManifestError, ModelPool, PoolConfig};

use crate::config::{LocalConfig, LocalDevice};
use crate::store::Store;

/// The sled tree of manifests.
pub const TREE_NAME: &str = "local_models";

/// Manifests in the store.
#[derive(Debug, Clone)]
pub struct Registry {
    tree: sled::Tree,
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("a local model named `{0}` is already registered; remove it first or pass replace")]
    Exists(String),
    #[error("no local model named `{0}` is registered")]
    NotFound(String),
    #[error("store: {0}")]
    Store(String),
}

impl Registry {
    pub fn open(store: &Store) -> Result<Registry, RegistryError> {
        store
            .tree(TREE_NAME)
            .map(|tree| Registry { tree })
            .map_err(|e| RegistryError::Store(e.to_string()))
    }

    /// Every manifest, by name; unreadable entries are skipped with a warning.
    pub fn list(&self) -> Vec<Manifest> {
        self.tree
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.ok()?;
                match serde_json::from_slice::<Manifest>(&v) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::warn!(name = %String::from_utf8_lossy(&k), error = %e, "unreadable local model manifest skipped");
                        None
                    }
                }
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Manifest> {
        let v = self.tree.get(name.as_bytes()).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Hashes the model at `path` and stores its manifest (durably).
    pub fn register(
        &self,
        path: &Path,
        name: &str,
        replace: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, RegistryError> {
        if !replace && self.get(name).is_some() {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let manifest = Manifest::inspect(path, name, progress)?;
        self.save(&manifest)?;
        Ok(manifest)
    }

    fn save(&self, manifest: &Manifest) -> Result<(), RegistryError> {
        let bytes =
            serde_json::to_vec(manifest).map_err(|e| RegistryError::Store(e.to_string()))?;
        self.tree
            .insert(manifest.name.as_bytes(), bytes)
            .and_then(|_| self.tree.flush())
            .map(|_| ())
            .map_err(|e| RegistryError::Store(e.to_string()))
    }

    /// Removes a manifest (durably); returns it.
    pub fn remove(&self, name: &str) -> Result<Manifest, RegistryError> {
        let manifest = self
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        self.tree
            .remove(name.as_bytes())
            .and_then(|_| self.tree.flush())
            .map_err(|e| RegistryError::Store(e.to_string()))?;
        Ok(manifest)
    }
}

/// The registry and the pool serving it.
#[derive(Debug, Clone)]
pub struct LocalModels {
    pub registry: Registry,
    pub pool: Arc<ModelPool>,
    /// Kept loaded (never reaped).
    pub preload: Vec<String>,
}

impl LocalModels {
    /// Reads the manifests, registers the models the config declares, builds the pool.
    /// Does not load anything (see [`LocalModels::preload`]).
    pub fn open(store: &Store, cfg: &LocalConfig) -> Result<LocalModels, String> {
        let registry = Registry::open(store).map_err(|e| e.to_string())?;
        for (name, path) in &cfg.models {
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let current = registry.get(name);
            if current.as_ref().is_some_and(|m| m.path == absolute) {
                continue;
            }
            tracing::info!(model = %name, path = %absolute.display(), "registering a local model from the config");
            registry
                .register(path, name, true, &mut |_, _| {})
                .map_err(|e| format!("local.models `{name}`: {e}"))?;
        }
        let pool = ModelPool::new(PoolConfig {
            memory_budget: cfg.memory_budget,
            keep_alive: cfg.keep_alive,
            queue_capacity: cfg.queue_capacity,
            max_batch: cfg.max_batch,
            load: LoadOptions {
                device: match cfg.device {
                    LocalDevice::Cpu => ComputeDevice::Cpu,
                    LocalDevice::Cuda(n) => ComputeDevice::Cuda(n),
                },
                ..LoadOptions::default()
            },
            pinned: cfg.preload.clone(),
        });
        for m in registry.list() {
            pool.register(m);
        }
        for name in &cfg.preload {
            if registry.get(name).is_none() {
                return Err(format!(
                    "local.preload: no local model named `{name}` is registered"
                ));
            }
        }
        Ok(LocalModels {
            registry,
            pool: Arc::new(pool),
            preload: cfg.preload.clone(),
        })
    }

    /// Loads the preloaded models; returns a message per failure.
    pub fn preload(&self) -> Vec<String> {
        self.pool
            .preload(&self.preload)
            .into_iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect()
    }

    /// Whether every preloaded model is loaded.
    pub fn ready(&self) -> bool {
        self.preload.iter().all(|n| self.pool.is_loaded(n))
    }

    /// Registers (hashing the files) and starts serving. Blocks.
    pub fn register(
        &self,
        path: &Path,
        name: &str,
        replace: bool,
    ) -> Result<Manifest, RegistryError> {
        let manifest = self
            .registry
            .register(path, name, replace, &mut |_, _| {})?;
        self.pool.register(manifest.clone());
        Ok(manifest)
    }

    /// Stops serving and forgets the model.
    pub fn remove(&self, name: &str) -> Result<Manifest, RegistryError> {
        let manifest = self.registry.remove(name)?;
        self.pool.remove(name);
        Ok(manifest)
    }
}

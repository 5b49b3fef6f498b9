//! The model pool: registered models, which of them are loaded, and when to unload.
//!
//! Owns the in-memory view of registered [`Manifest`]s (the gateway persists them) and
//! the loaded models: a chat model as an [`Engine`] (its own thread and queue), an
//! embedding model as a shared [`EmbeddingModel`]. Loading happens on first use
//! ([`ModelPool::get`]) or at start ([`ModelPool::preload`]); [`ModelPool::reap`]
//! unloads models idle past `keep_alive`; a memory budget bounds the loaded weights and
//! evicts the least recently used idle model to make room.
//!
//! Invariants:
//! - each model loads at most once at a time (a per-model load lock); concurrent
//!   callers wait for that load instead of starting their own;
//! - the files are verified against the manifest's sha256 before every load, so a file
//!   changed since registration is refused, never served;
//! - loaded bytes plus bytes being loaded never exceed the budget; a model in use (a
//!   request queued or running, or a caller holding it) or pinned (preloaded) is never
//!   evicted or reaped;
//! - every call here may block (hashing, loading): async callers use `spawn_blocking`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use airlock_models::{EmbeddingModel, LoadOptions};

use crate::engine::Engine;
use crate::manifest::{Manifest, ManifestError, ModelKind};

/// How the pool loads and unloads.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most bytes of weights loaded at once (estimated by file size); `None` = no cap.
    pub memory_budget: Option<u64>,
    /// Unload a model unused this long; `None` = keep loaded.
    pub keep_alive: Option<Duration>,
    /// Requests waiting per chat model before `Overloaded`.
    pub queue_capacity: usize,
    /// Requests a chat model runs at once (interleaved step by step).
    pub max_batch: usize,
    pub load: LoadOptions,
    /// Models never unloaded by `keep_alive` or evicted (the preloaded ones).
    pub pinned: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            memory_budget: None,
            keep_alive: Some(Duration::from_secs(300)),
            queue_capacity: 16,
            max_batch: 8,
            load: LoadOptions::default(),
            pinned: Vec::new(),
        }
    }
}

/// A loaded model, cheap to clone.
#[derive(Debug, Clone)]
pub enum Loaded {
    Chat(Arc<Engine>),
    Embedding(Arc<EmbeddingModel>),
}

impl Loaded {
    /// Requests queued or running (chat); embeddings run on the caller's thread.
    pub fn queue_depth(&self) -> usize {
        match self {
            Loaded::Chat(e) => e.queue_depth(),
            Loaded::Embedding(_) => 0,
        }
    }

    /// When it was last busy: the end of its last request (chat), else `None`.
    fn last_done(&self) -> Option<Instant> {
        match self {
            Loaded::Chat(e) => Some(e.last_done()),
            Loaded::Embedding(_) => None,
        }
    }

    /// Someone besides the pool holds it, or a request is queued.
    fn in_use(&self) -> bool {
        match self {
            Loaded::Chat(e) => Arc::strong_count(e) > 1 || e.queue_depth() > 0,
            Loaded::Embedding(m) => Arc::strong_count(m) > 1,
        }
    }

    fn max_context(&self) -> usize {
        match self {
            Loaded::Chat(e) => e.max_context(),
            Loaded::Embedding(m) => m.info().max_tokens,
        }
    }
}

/// Why a model cannot be used now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no local model named `{0}` is registered")]
    NotFound(String),
    #[error(transparent)]
    Changed(ManifestError),
    #[error("local model `{name}` could not be loaded: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("local model `{name}` needs {needed} bytes but the memory budget of {budget} bytes is taken by models in use")]
    OverBudget {
        name: String,
        needed: u64,
        budget: u64,
    },
}

/// One model's state, as `/v1/models` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub manifest: Manifest,
    pub loaded: bool,
    pub queue_depth: usize,
    /// Tokens a sequence may use: the loaded model's, else the file's metadata.
    pub context_length: Option<usize>,
}

struct Entry {
    manifest: Manifest,
    loaded: Option<Loaded>,
    last_used: Instant,
    load_lock: Arc<Mutex<()>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Bytes of loads in progress, counted against the budget.
    loading: u64,
}

/// Registered models and the loaded subset.
#[derive(Debug)]
pub struct ModelPool {
    config: PoolConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("models", &self.entries.len())
            .field("loading", &self.loading)
            .finish()
    }
}

impl ModelPool {
    pub fn new(config: PoolConfig) -> ModelPool {
        ModelPool {
            config,
            state: Mutex::default(),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a model; a replaced model is unloaded (requests already running
    /// on it finish).
    pub fn register(&self, manifest: Manifest) {
        let mut st = self.lock();
        st.entries.insert(
            manifest.name.clone(),
            Entry {
                manifest,
                loaded: None,
                last_used: Instant::now(),
                load_lock: Arc::default(),
            },
        );
    }

    /// Forgets a model and unloads it.
    pub fn remove(&self, name: &str) -> Option<Manifest> {
        self.lock().entries.remove(name).map(|e| e.manifest)
    }

    pub fn manifest(&self, name: &str) -> Option<Manifest> {
        self.lock().entries.get(name).map(|e| e.manifest.clone())
    }

    /// Every registered model with its state, sorted by name.
    pub fn list(&self) -> Vec<ModelStatus> {
        let st = self.lock();
        let mut v: Vec<ModelStatus> = st.entries.values().map(status).collect();
        v.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        v
    }

    pub fn status(&self, name: &str) -> Option<ModelStatus> {
        self.lock().entries.get(name).map(status)
    }

    /// The loaded model, loading it first if needed. Blocks.
    pub fn get(&self, name: &str) -> Result<Loaded, PoolError> {
        let load_lock = {
            let mut st = self.lock();
            let entry = st
                .entries
                .get_mut(name)
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            entry.last_used = Instant::now();
            if let Some(l) = &entry.loaded {
                return Ok(l.clone());
            }
            entry.load_lock.clone()
        };
        let _loading = load_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Someone else may have loaded it while we waited.
        let manifest = {
            let st = self.lock();
            let entry = st
                .entries
                .get(name)
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            if let Some(l) = &entry.loaded {
                return Ok(l.clone());
            }
            entry.manifest.clone()
        };
        manifest.verify().map_err(PoolError::Changed)?;
        self.make_room(&manifest)?;
        let loaded = self.load(&manifest);
        let mut st = self.lock();
        st.loading = st.loading.saturating_sub(manifest.bytes);
        let loaded = loaded?;
        match st.entries.get_mut(name) {
            // Removed or replaced meanwhile: serve this request, keep nothing.
            Some(entry) if entry.manifest == manifest => {
                entry.loaded = Some(loaded.clone());
                entry.last_used = Instant::now();
            }
            _ => {}
        }
        Ok(loaded)
    }

    /// Loads the named models now (at start); returns the failures.
    pub fn preload(&self, names: &[String]) -> Vec<(String, PoolError)> {
        names
            .iter()
            .filter_map(|n| self.get(n).err().map(|e| (n.clone(), e)))
            .collect()
    }

    /// Whether the model is loaded (without loading it).
    pub fn is_loaded(&self, name: &str) -> bool {
        self.lock()
            .entries
            .get(name)
            .is_some_and(|e| e.loaded.is_some())
    }

    /// Unloads models idle for `keep_alive` (since their last request ended) and not in
    /// use; returns their names.
    pub fn reap(&self, now: Instant) -> Vec<String> {
        let Some(keep) = self.config.keep_alive else {
            return Vec::new();
        };
        let mut st = self.lock();
        let mut gone = Vec::new();
        for (name, e) in st.entries.iter_mut() {
            let last = e
                .loaded
                .as_ref()
                .and_then(Loaded::last_done)
                .map_or(e.last_used, |d| d.max(e.last_used));
            let idle = now.saturating_duration_since(last) >= keep;
            if idle
                && !self.config.pinned.contains(name)
                && e.loaded.as_ref().is_some_and(|l| !l.in_use())
            {
                e.loaded = None;
                gone.push(name.clone());
            }
        }
        gone.sort();
        gone
    }

    /// Reserves `manifest.bytes` under the budget, evicting idle models, least
    /// recently used first.
    fn make_room(&self, manifest: &Manifest) -> Result<(), PoolError> {
        let mut st = self.lock();
        if let Some(budget) = self.config.memory_budget {
            loop {
                let used: u64 = st.loading
                    + st.entries
                        .values()
                        .filter(|e| e.loaded.is_some())
                        .map(|e| e.manifest.bytes)
                        .sum::<u64>();
                if used + manifest.bytes <= budget {
                    break;
                }
                let pinned = &self.config.pinned;
                let victim = st
                    .entries
                    .iter_mut()
                    .filter(|(n, _)| !pinned.contains(n))
                    .map(|(_, e)| e)
                    .filter(|e| e.loaded.as_ref().is_some_and(|l| !l.in_use()))
                    .min_by_key(|e| e.last_used);
                match victim {
                    Some(e) => e.loaded = None,
                    None => {
                        return Err(PoolError::OverBudget {
                            name: manifest.name.clone(),
                            needed: manifest.bytes,
                            budget,
                        })
                    }
                }
            }
        }
        st.loading += manifest.bytes;
        Ok(())
    }

    fn load(&self, manifest: &Manifest) -> Result<Loaded, PoolError> {
        let failed = |reason: String| PoolError::LoadFailed {
            name: manifest.name.clone(),
            reason,
        };
        match manifest.kind {
            ModelKind::Chat => {
                let model = airlock_models::load_with(&manifest.path, &self.config.load)
                    .map_err(|e| failed(e.to_string()))?;
                Ok(Loaded::Chat(Arc::new(Engine::start_batched(
                    model,
                    self.config.queue_capacity,
                    self.config.max_batch,
                ))))
            }
            ModelKind::Embedding => {
                let model = EmbeddingModel::load_on(&manifest.path, self.config.load.device)
                    .map_err(|e| failed(e.to_string()))?;
                Ok(Loaded::Embedding(Arc::new(model)))
            }
        }
    }
}

fn status(e: &Entry) -> ModelStatus {
    ModelStatus {
        manifest: e.manifest.clone(),
        loaded: e.loaded.is_some(),
        queue_depth: e.loaded.as_ref().map_or(0, Loaded::queue_depth),
        context_length: e
            .loaded
            .as_ref()
            .map(Loaded::max_context)
            .or(e.manifest.context_length),
    }
}

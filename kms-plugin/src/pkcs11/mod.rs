//! KEKs kept in a PKCS#11 token (an HSM; SoftHSM2 in tests), through the
//! `cryptoki` crate.
//!
//! - [`Pin`]: the user PIN, from `--pkcs11-pin-file` or `ATREST_PKCS11_PIN`,
//!   never argv; zeroized on drop, `Debug` redacted.
//! - [`Token`]: one initialised module, one token found by label (and
//!   serial), one `C_Login` (USER) held by a session kept open for it, and a
//!   bounded pool of sessions for the crypto calls. When every session is
//!   busy, a call waits at most the configured time and fails with
//!   [`HsmError::Busy`]: never an unbounded queue.
//! - Key objects: [`Token::generate_key`] makes a non-extractable, sensitive
//!   AES-256 token object allowed to encrypt and decrypt and nothing else;
//!   [`Token::adopt_key`] finds an existing one by label and refuses one that
//!   is extractable or not sensitive. [`Token::check_value`] computes the
//!   public check value of [`keyring::pkcs11`] (a GCM tag, never AES-ECB of a
//!   zero block: for a GCM key that is the hash key H).
//!
//! A wrong PIN (`CKR_PIN_INCORRECT`) or a locked one (`CKR_PIN_LOCKED`) is
//! never retried: a plugin in a restart loop must not lock the token. The
//! module path is a flag, not part of the keyring file: the same file is
//! copied to hosts whose client library lives elsewhere.

pub mod add;
pub mod calls;
pub mod serving;
pub mod setup;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keyring::pkcs11::{CHECK_AAD, CHECK_IV, CHECK_LEN};
use thiserror::Error;
use zeroize::Zeroizing;

/// Environment variable holding the PIN when no `--pkcs11-pin-file` is given.
pub const PIN_ENV: &str = "ATREST_PKCS11_PIN";
/// Environment variable holding the module path when no `--pkcs11-module` is given.
pub const MODULE_ENV: &str = "ATREST_PKCS11_MODULE";
/// Largest PIN file read.
const MAX_PIN_FILE: u64 = 4096;
/// GCM tag length in bits (128).
const TAG_BITS: usize = 128;
/// One module call in this many has its CPU time measured (and counted this
/// many times): an estimate, unbiased over many calls.
pub const CPU_SAMPLE_EVERY: u64 = 16;

/// The most `--pkcs11-max-sessions` may ask for.
pub const MAX_SESSIONS: usize = 1024;

/// Sessions of a hardware slot by default: enough to keep a network HSM's
/// round trips overlapping through an apiserver restart burst.
pub const HARDWARE_SESSIONS: usize = 16;

/// The default session bound for `slot`: [`HARDWARE_SESSIONS`] when the
/// slot says it is a hardware device (CKF_HW_SLOT), one per CPU otherwise —
/// a software token (SoftHSM2) computes on this host's CPUs, so more
/// concurrent calls than CPUs only contend for them (and for the module's
/// locks). A slot whose kind cannot be read counts as hardware.
pub fn default_sessions(ctx: &Pkcs11, slot: Slot) -> (usize, &'static str) {
    match ctx.get_slot_info(slot) {
        Ok(info) if !info.hardware_slot() => {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            (cpus.min(HARDWARE_SESSIONS), "one per CPU: a software token")
        }
        _ => (HARDWARE_SESSIONS, "a hardware slot"),
    }
}

/// The token user PIN. Zeroized on drop; `Debug` never shows it.
pub struct Pin(Zeroizing<String>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl Pin {
    /// The PIN from `file` when given, else from [`PIN_ENV`]. One trailing
    /// newline of a file is dropped. Errors never contain the PIN.
    pub fn resolve(file: Option<&Path>) -> Result<Pin, HsmError> {
        let env = std::env::var(PIN_ENV).ok().map(Zeroizing::new);
        match (file, env) {
            (Some(_), Some(_)) => Err(HsmError::Pin(format!(
                "both --pkcs11-pin-file and {PIN_ENV} are set; give one"
            ))),
            (Some(path), None) => {
                let bytes = atomic_file::read_bounded(path, MAX_PIN_FILE)
                    .map_err(|e| HsmError::Pin(format!("cannot read the PIN file: {e}")))?;
                let mut text = Zeroizing::new(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| HsmError::Pin(format!("{} is not UTF-8", path.display())))?,
                );
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                Pin::new(text)
            }
            (None, Some(text)) => Pin::new(text),
            (None, None) => Err(HsmError::Pin(format!(
                "no PIN: give --pkcs11-pin-file PATH or set {PIN_ENV}"
            ))),
        }
    }

    fn new(text: Zeroizing<String>) -> Result<Pin, HsmError> {
        if text.is_empty() {
            return Err(HsmError::Pin("the PIN is empty".into()));
        }
        Ok(Pin(text))
    }

    fn auth(&self) -> AuthPin {
        AuthPin::from(self.0.as_str())
    }
}

/// How to reach a token: the module, the PIN and the session pool's bounds.
#[derive(Debug)]
pub struct ModuleConfig {
    /// The PKCS#11 module (shared library).
    pub module: PathBuf,
    /// The user PIN.
    pub pin: Pin,
    /// Most sessions open for crypto calls at once; `None`: by the slot's
    /// kind ([`default_sessions`]).
    pub max_sessions: Option<usize>,
    /// How long a call waits for a free session before failing.
    pub session_wait: Duration,
}

/// What went wrong with the module or token. Never contains the PIN or a
/// key; the token label and key label are the operator's flags or public
/// keyring fields.
#[derive(Debug, Error)]
pub enum HsmError {
    /// The module could not be loaded or initialised.
    #[error("cannot use PKCS#11 module {path}: {reason}")]
    Module {
        /// The module path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No token with that label (and serial) is present.
    #[error("no PKCS#11 token labelled {token:?}{} is present in {module}", serial.as_deref().map(|s| format!(" with serial {s:?}")).unwrap_or_default())]
    TokenNotFound {
        /// The label looked for.
        token: String,
        /// The serial looked for.
        serial: Option<String>,
        /// The module path.
        module: PathBuf,
    },
    /// The PIN was refused. Never retried.
    #[error(
        "token {token:?} refused the PIN (CKR_PIN_INCORRECT); not retrying, so that restarts cannot lock the token: correct the PIN and start again"
    )]
    PinIncorrect {
        /// The token label.
        token: String,
    },
    /// The PIN is locked. Never retried.
    #[error(
        "token {token:?} has its user PIN locked (CKR_PIN_LOCKED); the security officer must unlock it"
    )]
    PinLocked {
        /// The token label.
        token: String,
    },
    /// The PIN could not be read.
    #[error("PKCS#11 PIN: {0}")]
    Pin(String),
    /// A PKCS#11 call failed.
    #[error("token {token:?}: {function} returned {rv}")]
    Call {
        /// The token label.
        token: String,
        /// The PKCS#11 function.
        function: String,
        /// The return value's name.
        rv: String,
        /// Whether the token is gone (removed, not present, device error).
        gone: bool,
    },
    /// No key object matched.
    #[error("token {token:?} has no AES key labelled {label:?}{}", id.as_deref().map(|i| format!(" with CKA_ID {i}")).unwrap_or_default())]
    KeyNotFound {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
        /// The CKA_ID looked for, hex.
        id: Option<String>,
    },
    /// Several key objects matched.
    #[error("token {token:?} has {count} AES keys labelled {label:?}; give a unique label")]
    KeyAmbiguous {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
        /// How many matched.
        count: usize,
    },
    /// A key to adopt may leave the token.
    #[error(
        "key {label:?} in token {token:?} is {what}; a KEK must be sensitive and non-extractable"
    )]
    KeyExposed {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
        /// What is wrong.
        what: &'static str,
    },
    /// The token object does not give the check value the keyring holds.
    #[error(
        "KEK {kek}: the key {label:?} in token {token:?} does not give the check value in the keyring (a wrong or replaced token key); refusing to serve it"
    )]
    CheckMismatch {
        /// The KEK number.
        kek: u32,
        /// The token label.
        token: String,
        /// The key label.
        label: String,
    },
    /// The token went away and is not back yet (the words say why).
    #[error("{0}")]
    Gone(String),
    /// Every session stayed busy for the whole wait.
    #[error(
        "PKCS#11 session pool of token {token:?} exhausted: all {max} sessions (--pkcs11-max-sessions) stayed busy for {wait:?} (--pkcs11-session-wait)"
    )]
    Busy {
        /// The token label.
        token: String,
        /// The pool size.
        max: usize,
        /// How long the call waited.
        wait: Duration,
    },
}

impl HsmError {
    /// Whether the error says the token went away (so the plugin should
    /// report it and reconnect), as opposed to a refused request.
    pub fn is_token_gone(&self) -> bool {
        matches!(self, HsmError::Call { gone: true, .. })
    }

    /// Whether every session of the pool stayed busy for the whole wait.
    pub fn is_busy(&self) -> bool {
        matches!(self, HsmError::Busy { .. })
    }
}

fn rv_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
    )
}

/// One token, logged in, with its session pool.
pub struct Token {
    ctx: Pkcs11,
    /// The token's slot (found again when the module is re-initialised).
    slot: Mutex<Slot>,
    serial: Option<String>,
    module: PathBuf,
    label: String,
    /// Keeps the login: PKCS#11 logs the application out of a token when its
    /// last session closes.
    _login: Mutex<Session>,
    pool: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
    /// Where `max` comes from (for the start's log line).
    max_why: &'static str,
    wait: Duration,
    /// Crypto calls made inside the module, and the time they took there
    /// (this thread's CPU time, and wall time).
    calls: AtomicU64,
    inside_nanos: AtomicU64,
    inside_wall_nanos: AtomicU64,
    /// The calls whose CPU time was measured (their time, scaled, is in
    /// `inside_nanos`).
    cpu_sampled_calls: AtomicU64,
    /// Calls that found every session busy and waited, and how long.
    waits: AtomicU64,
    wait_nanos: AtomicU64,
    /// Calls that waited the whole `--pkcs11-session-wait` and failed.
    exhausted: AtomicU64,
}

/// What a token's crypto calls cost inside the module (for `/metrics` and
/// the benchmark's split of plugin CPU into module time and our own
/// overhead), and its session pool's state. Cumulative since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenStats {
    /// Crypto calls (encrypt, decrypt, check value) made inside the module.
    pub calls: u64,
    /// Total CPU time of the calling threads inside those module calls
    /// (`C_EncryptInit`+`C_Encrypt`, `C_DecryptInit`+`C_Decrypt` only),
    /// estimated: measured on one call in [`CPU_SAMPLE_EVERY`] and scaled.
    pub inside: Duration,
    /// Total wall time inside those module calls.
    pub inside_wall: Duration,
    /// The calls whose CPU time was measured (one in
    /// [`CPU_SAMPLE_EVERY`]; `inside` is their time, scaled).
    pub cpu_sampled_calls: u64,
    /// Sessions open for crypto calls now.
    pub open_sessions: usize,
    /// Of those, sessions in use by a call now.
    pub busy_sessions: usize,
    /// Most sessions ever open at once for crypto calls.
    pub peak_sessions: usize,
    /// The pool's bound (`--pkcs11-max-sessions`).
    pub max_sessions: usize,
    /// Calls that found every session busy and waited for one.
    pub waits: u64,
    /// Total time those calls waited.
    pub waited: Duration,
    /// Calls that waited the whole `--pkcs11-session-wait` in vain and
    /// failed.
    pub exhausted: u64,
}

impl TokenStats {
    /// The sum of two tokens' statistics (peaks and bounds are summed too:
    /// the process's total).
    pub fn plus(self, o: TokenStats) -> TokenStats {
        TokenStats {
            calls: self.calls + o.calls,
            inside: self.inside + o.inside,
            inside_wall: self.inside_wall + o.inside_wall,
            cpu_sampled_calls: self.cpu_sampled_calls + o.cpu_sampled_calls,
            open_sessions: self.open_sessions + o.open_sessions,
            busy_sessions: self.busy_sessions + o.busy_sessions,
            peak_sessions: self.peak_sessions + o.peak_sessions,
            max_sessions: self.max_sessions + o.max_sessions,
            waits: self.waits + o.waits,
            waited: self.waited + o.waited,
            exhausted: self.exhausted + o.exhausted,
        }
    }

    /// The module's CPU time per call: the mean over the measured calls
    /// (`inside` unscaled, over `cpu_sampled_calls`). `inside / calls` would
    /// be off by up to [`CPU_SAMPLE_EVERY`] - 1 calls' worth while few calls
    /// were made. `None` before any call was measured.
    pub fn module_cpu_per_call(&self) -> Option<Duration> {
        let scale = u32::try_from(CPU_SAMPLE_EVERY).ok()?;
        u32::try_from(self.cpu_sampled_calls)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| self.inside / scale / n)
    }

    /// The module's wall time per call; `None` before any call.
    pub fn module_wall_per_call(&self) -> Option<Duration> {
        u32::try_from(self.calls)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| self.inside_wall / n)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("max_sessions", &self.max)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Session>,
    open: usize,
    peak: usize,
    /// Calls waiting on `freed` (a session freed with nobody waiting needs
    /// no wake-up: notifying costs a system call).
    waiting: usize,
}

impl Token {
    /// Loads and initialises the module, finds the token, opens a session
    /// and logs in once. A refused PIN is reported, never retried.
    pub fn open(
        config: &ModuleConfig,
        label: &str,
        serial: Option<&str>,
    ) -> Result<Token, HsmError> {
        let module_err = |reason: String| HsmError::Module {
            path: config.module.clone(),
            reason,
        };
        let ctx = Pkcs11::new(&config.module).map_err(|e| module_err(e.to_string()))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(module_err(format!("C_Initialize failed: {}", short(&e)))),
        }
        let slot = find_slot(&ctx, label, serial, &config.module)?;
        let (max, why) = match config.max_sessions {
            Some(n) => (n.max(1), "--pkcs11-max-sessions"),
            None => default_sessions(&ctx, slot),
        };
        let session = login(&ctx, slot, label, &config.pin)?;
        Ok(Token {
            ctx,
            slot: Mutex::new(slot),
            serial: serial.map(str::to_owned),
            module: config.module.clone(),
            label: label.to_owned(),
            _login: Mutex::new(session),
            pool: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            max,
            max_why: why,
            wait: config.session_wait,
            calls: AtomicU64::new(0),
            inside_nanos: AtomicU64::new(0),
            inside_wall_nanos: AtomicU64::new(0),
            cpu_sampled_calls: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
        })
    }

    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its session bound.
    pub fn max_sessions(&self) -> usize {
        self.max
    }

    /// Where the session bound comes from: the flag, or the slot's kind.
    pub fn max_sessions_reason(&self) -> &'static str {
        self.max_why
    }

    /// After the token went away: drops the idle sessions and, when the login
    /// session no longer answers, opens a new one and logs in again (once; a
    /// refused PIN is reported as such and must not be retried).
    pub fn relogin(&self, pin: &Pin) -> Result<(), HsmError> {
        {
            let mut state = lock(&self.pool);
            state.open = state.open.saturating_sub(state.idle.len());
            state.idle.clear();
        }
        let mut session = lock(&self._login);
        if session.get_session_info().is_ok() {
            return Ok(());
        }
        let slot = *lock(&self.slot);
        *session = login(&self.ctx, slot, &self.label, pin)?;
        Ok(())
    }

    /// The last resort of a reconnect: finalises and initialises the module
    /// again (some modules, SoftHSM2 among them, only see a token that came
    /// back after that), finds the token's slot again and logs in once.
    /// Every session and handle of the module becomes invalid: callers find
    /// their keys again. With several tokens behind one module, each
    /// re-initialisation invalidates the others' sessions too (they
    /// reconnect the same way).
    pub fn reinitialize(&self, pin: &Pin) -> Result<(), HsmError> {
        let mut session = lock(&self._login);
        {
            let mut state = lock(&self.pool);
            state.open = state.open.saturating_sub(state.idle.len());
            state.idle.clear();
        }
        let _ = self.ctx.clone().finalize();
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(HsmError::Module {
                    path: self.module.clone(),
                    reason: format!("C_Initialize failed: {}", short(&e)),
                });
            }
        }
        let slot = find_slot(&self.ctx, &self.label, self.serial.as_deref(), &self.module)?;
        *lock(&self.slot) = slot;
        *session = login(&self.ctx, slot, &self.label, pin)?;
        Ok(())
    }

    /// The cost of the crypto calls so far.
    pub fn stats(&self) -> TokenStats {
        let nanos = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        let (open, idle, peak) = {
            let state = lock(&self.pool);
            (state.open, state.idle.len(), state.peak)
        };
        TokenStats {
            calls: self.calls.load(Ordering::Relaxed),
            inside: nanos(&self.inside_nanos),
            inside_wall: nanos(&self.inside_wall_nanos),
            cpu_sampled_calls: self.cpu_sampled_calls.load(Ordering::Relaxed),
            open_sessions: open,
            busy_sessions: open.saturating_sub(idle),
            peak_sessions: peak,
            max_sessions: self.max,
            waits: self.waits.load(Ordering::Relaxed),
            waited: nanos(&self.wait_nanos),
            exhausted: self.exhausted.load(Ordering::Relaxed),
        }
    }

    /// Runs `call` (the module calls of one crypto operation, nothing else)
    /// and adds its wall time, and on one call in [`CPU_SAMPLE_EVERY`] its
    /// CPU time scaled up, to the token's account.
    fn timed<T>(&self, call: impl FnOnce() -> T) -> T {
        // CPU time of this thread inside the module (an in-process module
        // like SoftHSM2 computes on the calling thread; a network HSM's
        // client mostly waits, which the wall time shows). Reading a
        // thread's CPU clock is a system call (~0.5 µs, twice per call):
        // sampled, not paid on every call.
        let sampled = self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CPU_SAMPLE_EVERY);
        let cpu = sampled.then(thread_cpu);
        let wall = Instant::now();
        let out = call();
        let wall = saturating_nanos(wall.elapsed());
        if let Some(cpu) = cpu {
            let spent = thread_cpu().saturating_sub(cpu);
            self.inside_nanos
                .fetch_add(spent.saturating_mul(CPU_SAMPLE_EVERY), Ordering::Relaxed);
            self.cpu_sampled_calls.fetch_add(1, Ordering::Relaxed);
        }
        self.inside_wall_nanos.fetch_add(wall, Ordering::Relaxed);
        out
    }

    /// Runs `f` on a pooled session: an idle one, a new one while fewer than
    /// the maximum are open, or the first one freed within the wait.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Session) -> Result<T, CkError>,
    ) -> Result<T, HsmError> {
        // Set when the call first finds every session busy (no clock read
        // on the common path).
        let mut waiting_since: Option<Instant> = None;
        let session = {
            let mut state = lock(&self.pool);
            loop {
                if let Some(s) = state.idle.pop() {
                    break s;
                }
                if state.open < self.max {
                    state.open += 1;
                    state.peak = state.peak.max(state.open);
                    drop(state);
                    let slot = *lock(&self.slot);
                    match self.ctx.open_ro_session(slot) {
                        Ok(s) => break s,
                        Err(e) => {
                            lock(&self.pool).open -= 1;
                            self.freed.notify_one();
                            return Err(call_error(&self.label, e));
                        }
                    }
                }
                let now = Instant::now();
                let since = *waiting_since.get_or_insert(now);
                // A wait past the clock's range is a day (never unbounded).
                let deadline = since
                    .checked_add(self.wait)
                    .unwrap_or(since + Duration::from_secs(24 * 3600));
                if now >= deadline {
                    drop(state);
                    self.waited(since);
                    self.exhausted.fetch_add(1, Ordering::Relaxed);
                    return Err(HsmError::Busy {
                        token: self.label.clone(),
                        max: self.max,
                        wait: self.wait,
                    });
                }
                state.waiting += 1;
                state = match self.freed.wait_timeout(state, deadline - now) {
                    Ok((s, _)) => s,
                    Err(poisoned) => poisoned.into_inner().0,
                };
                state.waiting -= 1;
            }
        };
        if let Some(since) = waiting_since {
            self.waited(since);
        }
        let result = f(&session).map_err(|e| call_error(&self.label, e));
        let mut state = lock(&self.pool);
        let wake = state.waiting > 0;
        if matches!(&result, Err(e) if e.is_token_gone()) {
            // A session of a vanished token is useless; close it (drop).
            state.open -= 1;
            drop(state);
            drop(session);
        } else {
            state.idle.push(session);
            drop(state);
        }
        if wake {
            self.freed.notify_one();
        }
        result
    }

    /// Counts one call that waited for a session since `since`.
    fn waited(&self, since: Instant) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_nanos
            .fetch_add(saturating_nanos(since.elapsed()), Ordering::Relaxed);
    }

    /// Generates a non-extractable, sensitive AES-256 token object labelled
    /// `label` (default `atrest-kek-<first 8 CKA_ID bytes in hex>`) with a
    /// random 16-byte CKA_ID; it may encrypt and decrypt only. Returns its
    /// handle, label and CKA_ID.
    pub fn generate_key(
        &self,
        label: Option<&str>,
    ) -> Result<(ObjectHandle, String, Vec<u8>), HsmError> {
        let mut id = vec![0u8; 16];
        aes_gcm::aead::rand_core::RngCore::fill_bytes(&mut aes_gcm::aead::OsRng, &mut id);
        let label = label
            .map(str::to_owned)
            .unwrap_or_else(|| format!("atrest-kek-{}", hex::encode(&id[..8])));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let session = lock(&self._login);
        let handle = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| call_error(&self.label, e))?;
        Ok((handle, label, id))
    }

    /// Destroys a token object made by [`Self::generate_key`] that could not
    /// be added to the keyring (best effort; the error is the caller's to
    /// report).
    pub fn destroy_key(&self, key: ObjectHandle) -> Result<(), HsmError> {
        lock(&self._login)
            .destroy_object(key)
            .map_err(|e| call_error(&self.label, e))
    }

    /// Finds the one AES key labelled `label` (and with CKA_ID `id` when
    /// given). Returns its handle and CKA_ID. With `require_protected`, a
    /// key that is extractable or not sensitive is refused.
    pub fn find_key(
        &self,
        label: &str,
        id: Option<&[u8]>,
        require_protected: bool,
    ) -> Result<(ObjectHandle, Vec<u8>), HsmError> {
        let call = |e| call_error(&self.label, e);
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        if let Some(id) = id {
            template.push(Attribute::Id(id.to_vec()));
        }
        let session = lock(&self._login);
        let found = session.find_objects(&template).map_err(call)?;
        let handle = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(HsmError::KeyNotFound {
                    token: self.label.clone(),
                    label: label.to_owned(),
                    id: id.map(hex::encode),
                });
            }
            many => {
                return Err(HsmError::KeyAmbiguous {
                    token: self.label.clone(),
                    label: label.to_owned(),
                    count: many.len(),
                });
            }
        };
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Id,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(call)?;
        let mut key_id = Vec::new();
        let (mut sensitive, mut extractable) = (false, true);
        for a in attrs {
            match a {
                Attribute::Id(v) => key_id = v,
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                _ => {}
            }
        }
        if require_protected && (!sensitive || extractable) {
            return Err(HsmError::KeyExposed {
                token: self.label.clone(),
                label: label.to_owned(),
                what: if extractable {
                    "extractable"
                } else {
                    "not sensitive"
                },
            });
        }
        if key_id.is_empty() {
            return Err(HsmError::KeyNotFound {
                token: self.label.clone(),
                label: format!("{label} (it has no CKA_ID)"),
                id: None,
            });
        }
        Ok((handle, key_id))
    }

    /// The public check value of the key (see [`keyring::pkcs11`]): the GCM
    /// tag over an empty plaintext, zero IV, fixed AAD.
    pub fn check_value(&self, key: ObjectHandle) -> Result<[u8; CHECK_LEN], HsmError> {
        let tag = self.with_session(|s| {
            let mut iv = CHECK_IV;
            let mechanism =
                Mechanism::AesGcm(GcmParams::new(&mut iv, CHECK_AAD, TAG_BITS.try_into()?)?);
            self.timed(|| s.encrypt(&mechanism, key, &[]))
        })?;
        tag.as_slice().try_into().map_err(|_| HsmError::Call {
            token: self.label.clone(),
            function: "C_Encrypt (check value)".into(),
            rv: format!("{} bytes instead of a {CHECK_LEN}-byte tag", tag.len()),
            gone: false,
        })
    }

    /// AES-256-GCM encryption inside the token: returns ciphertext ‖ tag.
    pub fn encrypt(
        &self,
        key: ObjectHandle,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.with_session(|s| {
            let mut iv = *iv;
            let mechanism = Mechanism::AesGcm(GcmParams::new(&mut iv, aad, TAG_BITS.try_into()?)?);
            self.timed(|| s.encrypt(&mechanism, key, plaintext))
        })
    }

    /// AES-256-GCM decryption inside the token of ciphertext ‖ tag. An
    /// authentication failure is `Ok(None)`.
    pub fn decrypt(
        &self,
        key: ObjectHandle,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, HsmError> {
        self.with_session(|s| {
            let mut iv = *iv;
            let mechanism = Mechanism::AesGcm(GcmParams::new(&mut iv, aad, TAG_BITS.try_into()?)?);
            match self.timed(|| s.decrypt(&mechanism, key, sealed)) {
                Ok(p) => Ok(Some(Zeroizing::new(p))),
                // SoftHSM2 reports a failed GCM tag check as
                // CKR_GENERAL_ERROR (others as CKR_ENCRYPTED_DATA_INVALID):
                // on a decrypt these mean "not authentic". A token that is
                // gone answers with the token-gone codes instead, and the
                // self-test (an encrypt) notices it either way.
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::GeneralError
                    | RvError::FunctionFailed,
                    _,
                )) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

/// The slot holding the token labelled `label` (and `serial`).
fn find_slot(
    ctx: &Pkcs11,
    label: &str,
    serial: Option<&str>,
    module: &Path,
) -> Result<Slot, HsmError> {
    let call = |e: CkError| call_error(label, e);
    for slot in ctx.get_slots_with_token().map_err(call)? {
        let info = ctx.get_token_info(slot).map_err(call)?;
        if info.label().trim_end() == label
            && serial.is_none_or(|s| info.serial_number().trim_end() == s)
        {
            return Ok(slot);
        }
    }
    Err(HsmError::TokenNotFound {
        token: label.to_owned(),
        serial: serial.map(str::to_owned),
        module: module.to_owned(),
    })
}

/// Opens a read-write session and logs the user in: one attempt, a refused
/// PIN reported as such.
fn login(ctx: &Pkcs11, slot: Slot, label: &str, pin: &Pin) -> Result<Session, HsmError> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| call_error(label, e))?;
    match session.login(UserType::User, Some(&pin.auth())) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(HsmError::PinIncorrect {
            token: label.to_owned(),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(HsmError::PinLocked {
            token: label.to_owned(),
        }),
        Err(e) => Err(call_error(label, e)),
    }
}

/// This thread's CPU time in nanoseconds (0 if the clock cannot be read).
fn thread_cpu() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the pool lock leaves plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function:?} returned {}", rv_name(*rv)),
        other => other.to_string(),
    }
}

fn rv_name(rv: RvError) -> String {
    format!("{rv:?}")
}

fn call_error(token: &str, e: CkError) -> HsmError {
    match e {
        CkError::Pkcs11(rv, function) => HsmError::Call {
            token: token.to_owned(),
            function: format!("{function:?}"),
            rv: rv_name(rv),
            gone: rv_gone(rv),
        },
        other => HsmError::Call {
            token: token.to_owned(),
            function: "cryptoki".into(),
            rv: other.to_string(),
            gone: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_cpu_per_call_is_the_mean_of_the_measured_calls() {
        let none = TokenStats::default();
        assert_eq!(none.module_cpu_per_call(), None);
        assert_eq!(none.module_wall_per_call(), None);
        // Five calls, the first measured at 40 µs: the scaled total says
        // 640 µs (128 µs a call, more than the wall time); the mean of the
        // measured calls says 40.
        let few = TokenStats {
            calls: 5,
            inside: Duration::from_micros(40 * CPU_SAMPLE_EVERY),
            inside_wall: Duration::from_micros(300),
            cpu_sampled_calls: 1,
            ..TokenStats::default()
        };
        assert_eq!(few.module_cpu_per_call(), Some(Duration::from_micros(40)));
        assert_eq!(few.module_wall_per_call(), Some(Duration::from_micros(60)));
        let both = few.plus(TokenStats {
            calls: 16,
            inside: Duration::from_micros(20 * CPU_SAMPLE_EVERY),
            cpu_sampled_calls: 1,
            ..TokenStats::default()
        });
        assert_eq!(both.module_cpu_per_call(), Some(Duration::from_micros(30)));
    }

    #[test]
    fn the_pin_is_read_from_its_file_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "s3cret-PIN\r\n").unwrap();
        if std::env::var_os(PIN_ENV).is_some() {
            // Both sources given: refused, and the PIN is not in the message.
            let e = Pin::resolve(Some(&path)).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            return;
        }
        let pin = Pin::resolve(Some(&path)).unwrap();
        assert_eq!(pin.0.as_str(), "s3cret-PIN");
        let pin_shown = format!("{pin:?}");
        let shown = format!(
            "{pin_shown} {:?}",
            ModuleConfig {
                module: "/m.so".into(),
                pin,
                max_sessions: Some(1),
                session_wait: Duration::from_secs(1),
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");

        std::fs::write(&path, "\n").unwrap();
        assert!(
            Pin::resolve(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let e = Pin::resolve(Some(&dir.path().join("missing"))).unwrap_err();
        assert!(e.to_string().contains("cannot read the PIN file"), "{e}");
        assert!(
            Pin::resolve(None)
                .unwrap_err()
                .to_string()
                .contains("no PIN")
        );
    }

    #[test]
    fn token_gone_codes_are_told_from_refusals() {
        let gone = call_error(
            "t",
            CkError::Pkcs11(RvError::DeviceRemoved, cryptoki::context::Function::Encrypt),
        );
        assert!(gone.is_token_gone());
        assert!(gone.to_string().contains("DeviceRemoved"), "{gone}");
        let refused = call_error(
            "t",
            CkError::Pkcs11(
                RvError::MechanismInvalid,
                cryptoki::context::Function::Encrypt,
            ),
        );
        assert!(!refused.is_token_gone());
        assert!(!HsmError::PinIncorrect { token: "t".into() }.is_token_gone());
    }
}

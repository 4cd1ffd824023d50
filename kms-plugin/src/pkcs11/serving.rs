//! Serving KEKs that live in a token: the process's one PKCS#11
//! configuration ([`install`], set by `serve` before the keyring loads), the
//! tokens it opened (one login each, kept for the life of the process), and
//! [`resolve`], which turns a keyring reference into a key handle after
//! verifying its check value — at start and at every reload, so a wrong or
//! replaced token key is refused before it serves. Handles are found once
//! per keyring load, never per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::object::ObjectHandle;
use keyring::Pkcs11Ref;

use super::calls::{CallThreads, Offloaded, QueueStats};
use super::{HsmError, ModuleConfig, Token};

/// The PKCS#11 configuration of this process, the tokens it opened and the
/// threads that make their calls.
#[derive(Debug)]
pub struct Hsm {
    config: ModuleConfig,
    tokens: Mutex<HashMap<TokenName, Arc<Token>>>,
    /// Started once the first tokens are open (their slots decide the
    /// default count).
    calls: OnceLock<CallThreads>,
    starting: Mutex<()>,
}

/// A token's label and optional serial.
type TokenName = (String, Option<String>);

static HSM: OnceLock<Hsm> = OnceLock::new();

/// Sets the process's PKCS#11 configuration (once; later calls are ignored
/// and return `false`).
pub fn install(config: ModuleConfig) -> bool {
    HSM.set(Hsm {
        config,
        tokens: Mutex::new(HashMap::new()),
        calls: OnceLock::new(),
        starting: Mutex::new(()),
    })
    .is_ok()
}

/// The configuration, when `--pkcs11-module` was given.
pub fn installed() -> Option<&'static Hsm> {
    HSM.get()
}

/// How often a KEK whose token went away is looked for again (by the calls
/// and the background self-test that reach it).
pub const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// A KEK in a token, ready to serve. When the token goes away (removed,
/// device error, sessions or handles invalid) the handle is dropped and
/// calls fail with the reason until a reconnect — re-login where needed,
/// the key found again by label and CKA_ID, its check value verified —
/// succeeds. A refused PIN at reconnect stops the reconnects for good.
#[derive(Debug)]
pub struct TokenKey {
    token: Arc<Token>,
    kek: u32,
    reference: Pkcs11Ref,
    state: Mutex<KeyState>,
}

#[derive(Debug, Default)]
struct KeyState {
    handle: Option<ObjectHandle>,
    last_try: Option<Instant>,
    last_error: Option<String>,
    stopped: Option<String>,
}

impl TokenKey {
    fn handle(&self) -> Result<ObjectHandle, HsmError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = state.handle {
            return Ok(h);
        }
        if let Some(reason) = &state.stopped {
            return Err(HsmError::Gone(format!("{reason}; not retrying")));
        }
        if state
            .last_try
            .is_some_and(|t| t.elapsed() < RECONNECT_EVERY)
        {
            return Err(HsmError::Gone(
                state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the token is away".into()),
            ));
        }
        state.last_try = Some(Instant::now());
        let found = installed()
            .ok_or_else(|| HsmError::Gone("no PKCS#11 configuration".into()))
            .and_then(|hsm| {
                let pin = &hsm.config.pin;
                let again = self
                    .token
                    .relogin(pin)
                    .and_then(|()| find_and_verify(&self.token, self.kek, &self.reference));
                match again {
                    // Definite answers: a refused PIN, or a key that is not ours.
                    Err(
                        e @ (HsmError::PinIncorrect { .. }
                        | HsmError::PinLocked { .. }
                        | HsmError::CheckMismatch { .. }),
                    ) => Err(e),
                    Err(_) => {
                        self.token.reinitialize(pin)?;
                        find_and_verify(&self.token, self.kek, &self.reference)
                    }
                    ok => ok,
                }
            });
        match found {
            Ok(h) => {
                tracing::info!(kek = self.kek, token = %self.reference.token, "token key found again and its check value verified: serving it again");
                *state = KeyState {
                    handle: Some(h),
                    ..KeyState::default()
                };
                Ok(h)
            }
            Err(e) => {
                let text = format!(
                    "token {:?} is away or refuses KEK {} ({e})",
                    self.reference.token, self.kek
                );
                if matches!(
                    e,
                    HsmError::PinIncorrect { .. } | HsmError::PinLocked { .. }
                ) {
                    tracing::error!(error = %e, "reconnect refused the PIN: reconnects stop (restart with the right PIN)");
                    state.stopped = Some(text.clone());
                }
                state.last_error = Some(text.clone());
                Err(HsmError::Gone(text))
            }
        }
    }

    fn lost(&self, e: &HsmError) {
        if e.is_token_gone() {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.handle.take().is_some() {
                tracing::warn!(kek = self.kek, token = %self.reference.token, error = %e, "token went away: its KEK fails with UNAVAILABLE until it is back");
            }
            state.last_error = Some(format!("token {:?} went away ({e})", self.reference.token));
        }
    }

    /// AES-256-GCM inside the token (see [`Token::encrypt`]).
    pub fn encrypt(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let h = self.handle()?;
        self.token
            .encrypt(h, iv, aad, plaintext)
            .inspect_err(|e| self.lost(e))
    }

    /// AES-256-GCM inside the token (see [`Token::decrypt`]).
    pub fn decrypt(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, HsmError> {
        let h = self.handle()?;
        self.token
            .decrypt(h, iv, aad, sealed)
            .inspect_err(|e| self.lost(e))
    }
}

fn find_and_verify(
    token: &Token,
    kek: u32,
    reference: &Pkcs11Ref,
) -> Result<ObjectHandle, HsmError> {
    let (handle, _) = token.find_key(&reference.key_label, Some(&reference.id), false)?;
    if token.check_value(handle)? != reference.check_value {
        return Err(HsmError::CheckMismatch {
            kek,
            token: reference.token.clone(),
            label: reference.key_label.clone(),
        });
    }
    Ok(handle)
}

impl Hsm {
    /// Starts the token call threads (once): `--pkcs11-max-sessions`, or
    /// the largest session bound of the tokens open now (each from its
    /// slot's kind), or [`super::HARDWARE_SESSIONS`] when none is.
    pub fn start_calls(&self) -> Result<&CallThreads, HsmError> {
        if let Some(calls) = self.calls.get() {
            return Ok(calls);
        }
        let _one = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(calls) = self.calls.get() {
            return Ok(calls);
        }
        let threads = self.config.max_sessions.unwrap_or_else(|| {
            let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens
                .values()
                .map(|t| t.max_sessions())
                .max()
                .unwrap_or(super::HARDWARE_SESSIONS)
        });
        let calls = CallThreads::start(threads, self.config.session_wait).map_err(|e| {
            HsmError::Module {
                path: self.config.module.clone(),
                reason: format!("cannot start the token call threads: {e}"),
            }
        })?;
        tracing::info!(threads, "PKCS#11 token call threads started");
        Ok(self.calls.get_or_init(|| calls))
    }

    /// Runs a call that reaches a token on one of the token call threads
    /// (see [`super::calls`]).
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Offloaded<T> {
        match self.start_calls() {
            Ok(calls) => calls.run(call).await,
            Err(e) => {
                tracing::error!(error = %e, "a token call could not be made");
                Offloaded::Lost
            }
        }
    }

    /// Why a call that waited in the queue too long was refused: a token's
    /// own pool refusal ([`HsmError::Busy`]), as the threads are its sessions.
    pub fn busy_reason(&self) -> String {
        let token = {
            let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            let mut labels: Vec<&str> = tokens.keys().map(|(l, _)| l.as_str()).collect();
            labels.sort_unstable();
            labels.join(", ")
        };
        HsmError::Busy {
            token,
            max: self.calls.get().map_or(0, CallThreads::threads),
            wait: self.config.session_wait,
        }
        .to_string()
    }

    /// The token call queue's account.
    pub fn queue_stats(&self) -> QueueStats {
        self.calls.get().map(CallThreads::stats).unwrap_or_default()
    }

    /// The token a reference names, opened (and logged in) on first use.
    pub fn token(&self, reference: &Pkcs11Ref) -> Result<Arc<Token>, HsmError> {
        let key = (reference.token.clone(), reference.serial.clone());
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tokens.get(&key) {
            return Ok(t.clone());
        }
        let token = Arc::new(Token::open(
            &self.config,
            &reference.token,
            reference.serial.as_deref(),
        )?);
        tokens.insert(key, token.clone());
        Ok(token)
    }

    /// Every token's statistics summed (what `/metrics` shows).
    pub fn stats(&self) -> super::TokenStats {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let mut stats = tokens
            .values()
            .map(|t| t.stats())
            .fold(super::TokenStats::default(), super::TokenStats::plus);
        // A call waits for a session in the call queue (one thread per
        // session), or in a token's pool when several tokens share them.
        let queue = self.queue_stats();
        stats.waits += queue.waits;
        stats.waited += queue.waited;
        stats.exhausted += queue.timed_out;
        stats
    }

    /// Logs what every token's crypto calls cost inside the module (at the
    /// end of `serve`): calls, time inside the module per call, peak sessions.
    pub fn log_stats(&self) {
        let queue = self.queue_stats();
        tracing::info!(
            threads = self.calls.get().map_or(0, CallThreads::threads),
            queue_waits = queue.waits,
            queue_wait_ms = queue.waited.as_millis(),
            queue_timed_out = queue.timed_out,
            "PKCS#11 call queue"
        );
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        for ((label, _), token) in tokens.iter() {
            let s = token.stats();
            let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
            let per_call_us = us(s.module_cpu_per_call());
            let wall_us = us(s.module_wall_per_call());
            tracing::info!(
                token = %label,
                calls = s.calls,
                module_cpu_us_per_call = format!("{per_call_us:.1}"),
                module_wall_us_per_call = format!("{wall_us:.1}"),
                peak_sessions = s.peak_sessions,
                session_waits = s.waits,
                pool_exhausted = s.exhausted,
                "PKCS#11 usage"
            );
        }
    }

    /// Finds the key object of KEK `kek` and verifies its check value.
    pub fn resolve(&self, kek: u32, reference: &Pkcs11Ref) -> Result<TokenKey, HsmError> {
        let token = self.token(reference)?;
        let handle = find_and_verify(&token, kek, reference)?;
        Ok(TokenKey {
            token,
            kek,
            reference: reference.clone(),
            state: Mutex::new(KeyState {
                handle: Some(handle),
                ..KeyState::default()
            }),
        })
    }
}

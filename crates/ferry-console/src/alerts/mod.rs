//! Alerts: the pure rules engine ([`rules`]), delivery by e-mail and webhook
//! ([`delivery`]), and [`Alerter`], which runs the engine after every poll, records each
//! alert and delivery in the store, and sends the notifications.

pub mod delivery;
pub mod rules;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::store::{DeliveryRow, Store};
use delivery::ChannelSettings;
use rules::{Condition, Engine, Observations, RuleSettings, TransitionKind};

/// The store key of [`AlertSettings`].
pub const SETTINGS_KEY: &str = "alerts";

/// Everything about alerts an operator sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertSettings {
    /// Which conditions alert.
    pub rules: RuleSettings,
    /// Where notifications go.
    pub channels: ChannelSettings,
    /// The console's own URL, for links in mails.
    pub console_url: String,
}

/// Runs the rules after each poll and delivers transitions.
pub struct Alerter {
    store: Arc<Store>,
    engine: Mutex<Engine>,
}

impl Alerter {
    /// An alerter that knows the alerts already active in the store.
    pub fn new(store: Arc<Store>) -> Self {
        let active = store.alerts(0).map(|(a, _)| a).unwrap_or_default();
        let engine = Engine::with_active(active.into_iter().map(|a| {
            let hosts = rules::hosts_of_key(&a.key, &a.host);
            (
                Condition {
                    key: a.key,
                    rule: rule_name(&a.rule),
                    host: a.host,
                    hosts,
                    vm: a.vm,
                    message: a.message,
                    hold_s: 0,
                },
                a.started_at,
            )
        }));
        Self {
            store,
            engine: Mutex::new(engine),
        }
    }

    /// One evaluation: opens and clears alerts in the store and delivers each transition.
    pub async fn evaluate(&self, obs: &Observations, now: i64) {
        let settings: AlertSettings = match self.store.setting(SETTINGS_KEY) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!("cannot read alert settings: {e}");
                return;
            }
        };
        let present = rules::conditions(obs, &settings.rules, now);
        let transitions = self.engine.lock().await.step(
            present,
            &obs.reachable,
            i64::from(settings.rules.debounce_s),
            now,
        );
        for t in transitions {
            let c = &t.condition;
            let id = match t.kind {
                TransitionKind::Start => self.store.open_alert(
                    &c.key,
                    c.rule,
                    &c.host,
                    c.vm.as_deref(),
                    &c.message,
                    t.at,
                ),
                TransitionKind::Clear => self
                    .store
                    .clear_alert(&c.key, t.at)
                    .map(|id| id.unwrap_or(0)),
            };
            let id = match id {
                Ok(id) => id,
                Err(e) => {
                    tracing::error!("cannot record alert {}: {e}", c.key);
                    continue;
                }
            };
            tracing::info!(alert = id, key = %c.key, kind = ?t.kind, "alert transition");
            let transition = match t.kind {
                TransitionKind::Start => "start",
                TransitionKind::Clear => "clear",
            };
            for o in delivery::deliver(&settings.channels, &t, id, &settings.console_url).await {
                if let Some(e) = &o.error {
                    tracing::warn!(alert = id, channel = o.channel, "delivery failed: {e}");
                }
                let row = DeliveryRow {
                    transition: transition.into(),
                    channel: o.channel.into(),
                    at: now,
                    ok: o.error.is_none(),
                    error: o.error,
                };
                if let Err(e) = self.store.add_delivery(id, &row) {
                    tracing::error!("cannot record a delivery: {e}");
                }
            }
        }
    }
}

/// The static name of a stored rule (unknown names from a newer console stay "other").
fn rule_name(s: &str) -> &'static str {
    [
        "host_unreachable",
        "health",
        "rpo",
        "resync_required",
        "initial_not_finished",
        "failover_not_reversed",
        "test_failover_age",
        "storage_free",
    ]
    .into_iter()
    .find(|r| *r == s)
    .unwrap_or("other")
}

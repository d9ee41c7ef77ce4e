//! Fault injection for tests and demos: `VM_FAULT_INJECTION="<stage_key>=<fault>,…"`.
//! Faults: `fail`, `fail-once`, `fail-fatal`, `hang`, `delay-<ms>`.

use super::{StageContext, StageError, StageOutput, StageRunner, STAGE_EXECUTION_ERROR};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Fail,
    FailOnce,
    FailFatal,
    Hang,
    Delay(u64),
}

pub type FaultPlan = BTreeMap<String, Fault>;

/// Parse `research=fail-once,keywords=delay-200`.
pub fn parse(spec: &str) -> Result<FaultPlan, String> {
    let mut plan = FaultPlan::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, fault) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}`: expected <stage_key>=<fault>"))?;
        let fault = match fault.trim() {
            "fail" => Fault::Fail,
            "fail-once" => Fault::FailOnce,
            "fail-fatal" => Fault::FailFatal,
            "hang" => Fault::Hang,
            other => match other.strip_prefix("delay-").map(str::parse::<u64>) {
                Some(Ok(ms)) => Fault::Delay(ms),
                _ => {
                    return Err(format!(
                        "`{item}`: unknown fault `{other}` (fail, fail-once, fail-fatal, hang, delay-<ms>)"
                    ))
                }
            },
        };
        plan.insert(key.trim().to_string(), fault);
    }
    Ok(plan)
}

/// Wraps a runner and injects the planned faults.
pub struct FaultInjectingRunner {
    pub inner: Arc<dyn StageRunner>,
    pub plan: FaultPlan,
}

fn injected(ctx: &StageContext, what: &str, retryable: bool) -> StageError {
    StageError {
        code: STAGE_EXECUTION_ERROR.into(),
        message: format!(
            "injected fault `{what}` at stage {} attempt {}",
            ctx.stage_key, ctx.attempt
        ),
        retryable,
    }
}

impl StageRunner for FaultInjectingRunner {
    fn name(&self) -> &'static str {
        "fault-injecting"
    }

    fn execute<'a>(
        &'a self,
        ctx: &'a StageContext,
    ) -> BoxFuture<'a, Result<StageOutput, StageError>> {
        async move {
            match self.plan.get(&ctx.stage_key) {
                Some(Fault::Fail) => return Err(injected(ctx, "fail", true)),
                Some(Fault::FailOnce) if ctx.attempt == 1 => {
                    return Err(injected(ctx, "fail-once", true))
                }
                Some(Fault::FailFatal) => return Err(injected(ctx, "fail-fatal", false)),
                Some(Fault::Hang) => futures::future::pending::<()>().await,
                Some(Fault::Delay(ms)) => tokio::time::sleep(Duration::from_millis(*ms)).await,
                Some(Fault::FailOnce) | None => {}
            }
            self.inner.execute(ctx).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault() {
        let plan = parse(
            "research=fail, brand-voice=fail-once,positioning=fail-fatal,keywords=hang,x=delay-250",
        )
        .expect("ok");
        assert_eq!(plan["research"], Fault::Fail);
        assert_eq!(plan["brand-voice"], Fault::FailOnce);
        assert_eq!(plan["positioning"], Fault::FailFatal);
        assert_eq!(plan["keywords"], Fault::Hang);
        assert_eq!(plan["x"], Fault::Delay(250));
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(parse("research").is_err());
        assert!(parse("research=explode").is_err());
        assert!(parse("research=delay-x").is_err());
    }
}

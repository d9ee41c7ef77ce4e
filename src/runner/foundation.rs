//! The default Foundation runner: deterministic markdown from the request, no network.

use super::{StageContext, StageError, StageOutput, StageRunner};
use futures::future::BoxFuture;
use futures::FutureExt;

#[derive(Debug, Default)]
pub struct FoundationRunner;

fn research(ctx: &StageContext) -> String {
    format!(
        "# Research Report\n\nContext: `{key}`\n\n## Query\n\n{query}\n\n## Provider Chain\n\nfoundation-local\n\n\
## Sources Captured\n\nNo external sources captured in this run.\n\n## Quick Synthesis\n\n\
- The request centres on: {query}\n- Validate the strongest claims with customer evidence before scaling.\n\n\
## Next Step\n\nAwait manual approval for `brand-voice`.\n",
        key = ctx.isolation_key(),
        query = ctx.request_text
    )
}

fn brand_voice(ctx: &StageContext) -> String {
    format!(
        "# Brand Voice Guide\n\nContext: `{key}`\n\n## Voice Summary\n\n- Positioning context: {query}\n\
- Tone: clear, evidence-led, pragmatic\n\n## Words to Use\n\n- claro\n- mensurável\n- consistente\n\n\
## Words to Avoid\n\n- revolucionário\n- game-changing\n- sinergia\n\n## Sample Rewrite\n\n\
- Before: \"The revolutionary platform for everyone.\"\n- After: \"A measurable way to {query}.\"\n",
        key = ctx.isolation_key(),
        query = ctx.request_text
    )
}

fn positioning(ctx: &StageContext) -> String {
    format!(
        "# Positioning Strategy\n\nContext: `{key}`\n\n## Chosen Angle\n\nThe dependable, measurable answer to: {query}\n\n\
## Tradeoffs\n\n- Depth over breadth: fewer claims, each backed by evidence.\n- Clarity over novelty.\n\n\
## Validation Signal\n\nQualified demo requests grow week over week after launch.\n",
        key = ctx.isolation_key(),
        query = ctx.request_text
    )
}

fn keyword_map(ctx: &StageContext) -> String {
    format!(
        "# Keyword Map\n\nContext: `{key}`\n\nRequest: {query}\n\n| Keyword | Intent | Stage |\n|---|---|---|\n\
| crm for clinics | commercial | consideration |\n| patient follow-up software | informational | awareness |\n\
| clinic crm pricing | transactional | decision |\n",
        key = ctx.isolation_key(),
        query = ctx.request_text
    )
}

fn brief(ctx: &StageContext) -> String {
    let mut completed: Vec<&str> = ctx.completed_stages.iter().map(String::as_str).collect();
    completed.push(&ctx.stage_key);
    let list: String = completed.iter().map(|s| format!("- {s}\n")).collect();
    format!(
        "# Foundation Brief\n\nContext: `{key}`\n\n## Summary\n\n- Query: {query}\n- Requested mode: {req}\n\
- Effective mode: {eff}\n- Provider chain of research: foundation-local\n- Fallback used: {fb}\n\n\
## Completed Stages\n\n{list}\n## Next Action\n\nShare this brief with the team and plan the first campaign.\n",
        key = ctx.isolation_key(),
        query = ctx.request_text,
        req = ctx.requested_mode,
        eff = ctx.effective_mode,
        fb = if ctx.fallback_applied { "True" } else { "False" },
    )
}

fn generic(ctx: &StageContext) -> String {
    let skills: String = ctx.skills.iter().map(|s| format!("- {s}\n")).collect();
    format!(
        "# {stage}\n\nContext: `{key}`\n\nMode: {mode}\n\n## Request\n\n{query}\n\n## Skills\n\n{skills}\n\
## Output\n\nStage `{stage}` prepared for: {query}\n",
        stage = ctx.stage_key,
        key = ctx.isolation_key(),
        mode = ctx.effective_mode,
        query = ctx.request_text,
    )
}

/// The artifacts of a stage: the four Foundation keys have fixed paths, any other key gets
/// `stages/<key>.md`.
pub fn artifacts_for(ctx: &StageContext) -> Vec<(String, String)> {
    match ctx.stage_key.as_str() {
        "research" => vec![("research/research-report.md".into(), research(ctx))],
        "brand-voice" => vec![("strategy/brand-voice-guide.md".into(), brand_voice(ctx))],
        "positioning" => vec![("strategy/positioning-strategy.md".into(), positioning(ctx))],
        "keywords" => vec![
            ("strategy/keyword-map.md".into(), keyword_map(ctx)),
            ("final/foundation-brief.md".into(), brief(ctx)),
        ],
        key => vec![(format!("stages/{key}.md"), generic(ctx))],
    }
}

impl StageRunner for FoundationRunner {
    fn name(&self) -> &'static str {
        "foundation"
    }

    fn execute<'a>(
        &'a self,
        ctx: &'a StageContext,
    ) -> BoxFuture<'a, Result<StageOutput, StageError>> {
        async move {
            let artifacts = artifacts_for(ctx);
            let is_last = ctx.stage_keys.last() == Some(&ctx.stage_key);
            let next = ctx
                .stage_keys
                .iter()
                .skip_while(|k| *k != &ctx.stage_key)
                .nth(1);
            Ok(StageOutput {
                summary: format!("stage {} completed", ctx.stage_key),
                pipeline_status: match (is_last, next) {
                    (true, _) | (_, None) => "completed".into(),
                    (false, Some(_)) => "running".into(),
                },
                artifacts,
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::runner::tests::context as ctx;

    #[test]
    fn foundation_stages_have_their_artifacts_and_headings() {
        let r = artifacts_for(&ctx("run-a", "research"));
        assert_eq!(r[0].0, "research/research-report.md");
        for h in [
            "## Query",
            "## Provider Chain",
            "## Sources Captured",
            "## Quick Synthesis",
            "## Next Step",
        ] {
            assert!(r[0].1.contains(h), "{h}");
        }
        let bv = artifacts_for(&ctx("run-a", "brand-voice"));
        assert!(bv[0].1.contains("## Words to Avoid") && !bv[0].1.contains("Status: completed"));
        let k = artifacts_for(&ctx("run-a", "keywords"));
        let paths: Vec<_> = k.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(
            paths,
            ["strategy/keyword-map.md", "final/foundation-brief.md"]
        );
        assert!(k[1].1.contains("## Completed Stages") && k[1].1.contains("- keywords"));
        assert!(k[1].1.contains("Fallback used: True"));
    }

    #[test]
    fn runs_are_isolated() {
        let a = artifacts_for(&ctx("run-a", "research"));
        let b = artifacts_for(&ctx("run-b", "research"));
        assert!(a[0].1.contains("t-shared--run-a") && b[0].1.contains("t-shared--run-b"));
        assert_ne!(a[0].1, b[0].1);
    }

    #[test]
    fn other_stage_keys_get_content() {
        let g = artifacts_for(&ctx("run-a", "topic_map"));
        assert_eq!(g[0].0, "stages/topic_map.md");
        assert!(g[0].1.contains("03-strategy/x") && g[0].1.contains("CRM for clinics"));
    }
}

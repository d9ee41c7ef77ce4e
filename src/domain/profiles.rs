//! Workflow profiles (YAML) and the mode resolution contract.

use crate::error::AppError;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageDef {
    pub key: String,
    pub skills: Vec<String>,
    pub approval_required: bool,
    pub retry_policy: RetryPolicy,
    pub timeout_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub mode: String,
    pub description: String,
    pub stages: Vec<StageDef>,
}

/// A validated profiles file, profiles sorted by mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSet {
    pub version: String,
    pub profiles: Vec<Profile>,
    /// Each profile's [`digest`], in the order of `profiles`: a plan without skill overrides
    /// has its profile's digest, taken here once instead of at every start (it was 1.7 % of a
    /// start's CPU, BENCHMARKS.md, "What a start costs").
    digests: Vec<String>,
}

/// The two settings that drive resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolveSettings {
    pub force_foundation_fallback: bool,
    pub foundation_mode: String,
}

impl Default for ResolveSettings {
    fn default() -> Self {
        Self {
            force_foundation_fallback: true,
            foundation_mode: "foundation_stack".into(),
        }
    }
}

pub type SkillOverrides = BTreeMap<String, Vec<String>>;

/// The immutable plan of a run, stored when it is queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanSnapshot {
    pub requested_mode: String,
    pub effective_mode: String,
    pub fallback_applied: bool,
    pub profile_version: String,
    pub profile_digest: String,
    pub description: String,
    pub skill_overrides: SkillOverrides,
    pub stages: Vec<StageDef>,
}

/// A profiles file that cannot be used, naming the file, the profile and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {location}: {message}")]
pub struct ProfileError {
    pub file: String,
    pub location: String,
    pub message: String,
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, location: impl Into<String>, message: impl Into<String>) -> ProfileError {
        ProfileError {
            file: self.file.to_string(),
            location: location.into(),
            message: message.into(),
        }
    }
}

fn get<'v>(map: &'v serde_yaml::Mapping, key: &str) -> Option<&'v Value> {
    map.get(Value::String(key.to_string()))
}

fn non_empty_str(ctx: &Ctx, loc: &str, v: Option<&Value>) -> Result<String, ProfileError> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Value::String(_)) => Err(ctx.err(loc, "must not be empty")),
        None | Some(Value::Null) => Err(ctx.err(loc, "is required")),
        Some(_) => Err(ctx.err(loc, "must be a string")),
    }
}

fn number(ctx: &Ctx, loc: &str, v: &Value) -> Result<f64, ProfileError> {
    v.as_f64().ok_or_else(|| ctx.err(loc, "must be a number"))
}

impl ProfileSet {
    /// Parse and validate a profiles file; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ProfileSet, ProfileError> {
        let ctx = Ctx { file };
        let root: Value = serde_yaml::from_str(text)
            .map_err(|e| ctx.err("document", format!("invalid YAML: {e}")))?;
        let root = root.as_mapping().ok_or_else(|| {
            ctx.err(
                "document",
                "must be a mapping with `version` and `profiles`",
            )
        })?;
        let version = match get(root, "version") {
            Some(Value::Number(n)) => n.to_string(),
            other => non_empty_str(&ctx, "version", other)?,
        };
        let list = match get(root, "profiles") {
            Some(Value::Sequence(list)) if !list.is_empty() => list,
            Some(Value::Sequence(_)) => return Err(ctx.err("profiles", "must not be empty")),
            None | Some(Value::Null) => return Err(ctx.err("profiles", "is required")),
            Some(_) => return Err(ctx.err("profiles", "must be a list")),
        };
        let mut profiles = Vec::with_capacity(list.len());
        let mut modes = BTreeSet::new();
        for (i, item) in list.iter().enumerate() {
            let at = format!("profiles[{i}]");
            let map = item
                .as_mapping()
                .ok_or_else(|| ctx.err(&at, "must be a mapping"))?;
            let mode = non_empty_str(&ctx, &format!("{at}.mode"), get(map, "mode"))?;
            let at = format!("profile `{mode}`");
            if !modes.insert(mode.clone()) {
                return Err(ctx.err(format!("{at}.mode"), "is duplicated"));
            }
            let description = match get(map, "description") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.trim().to_string(),
                Some(_) => return Err(ctx.err(format!("{at}.description"), "must be a string")),
            };
            let stages = Self::parse_stages(&ctx, &at, get(map, "stages"))?;
            profiles.push(Profile {
                mode,
                description,
                stages,
            });
        }
        profiles.sort_by(|a, b| a.mode.cmp(&b.mode));
        let digests = profiles.iter().map(digest).collect();
        Ok(ProfileSet {
            version,
            profiles,
            digests,
        })
    }

    fn parse_stages(ctx: &Ctx, at: &str, v: Option<&Value>) -> Result<Vec<StageDef>, ProfileError> {
        let list = match v {
            Some(Value::Sequence(list)) if !list.is_empty() => list,
            Some(Value::Sequence(_)) => {
                return Err(ctx.err(format!("{at}.stages"), "must not be empty"))
            }
            None | Some(Value::Null) => return Err(ctx.err(format!("{at}.stages"), "is required")),
            Some(_) => return Err(ctx.err(format!("{at}.stages"), "must be a list")),
        };
        let mut keys = BTreeSet::new();
        let mut stages = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let sat = format!("{at}.stages[{i}]");
            let map = item
                .as_mapping()
                .ok_or_else(|| ctx.err(&sat, "must be a mapping"))?;
            let key = non_empty_str(ctx, &format!("{sat}.key"), get(map, "key"))?;
            if !keys.insert(key.clone()) {
                return Err(ctx.err(format!("{sat}.key"), format!("`{key}` is duplicated")));
            }
            let sat = format!("{at}.stage `{key}`");
            let skills = match get(map, "skills") {
                Some(Value::Sequence(items)) if !items.is_empty() => items
                    .iter()
                    .enumerate()
                    .map(|(j, s)| non_empty_str(ctx, &format!("{sat}.skills[{j}]"), Some(s)))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(Value::Sequence(_)) => {
                    return Err(ctx.err(format!("{sat}.skills"), "must not be empty"))
                }
                None | Some(Value::Null) => {
                    return Err(ctx.err(format!("{sat}.skills"), "is required"))
                }
                Some(_) => {
                    return Err(ctx.err(format!("{sat}.skills"), "must be a list of strings"))
                }
            };
            let approval_required = match get(map, "approval_required") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ctx.err(format!("{sat}.approval_required"), "must be true or false"))
                }
            };
            let mut retry = RetryPolicy {
                max_attempts: 1,
                backoff_seconds: 0.0,
            };
            match get(map, "retry_policy") {
                None | Some(Value::Null) => {}
                Some(Value::Mapping(rp)) => {
                    if let Some(v) = get(rp, "max_attempts") {
                        let loc = format!("{sat}.retry_policy.max_attempts");
                        let n = v
                            .as_u64()
                            .ok_or_else(|| ctx.err(&loc, "must be an integer >= 1"))?;
                        if !(1..=100).contains(&n) {
                            return Err(ctx.err(&loc, "must be an integer between 1 and 100"));
                        }
                        retry.max_attempts = n as u32;
                    }
                    if let Some(v) = get(rp, "backoff_seconds") {
                        let loc = format!("{sat}.retry_policy.backoff_seconds");
                        let n = number(ctx, &loc, v)?;
                        if !(0.0..=3600.0).contains(&n) {
                            return Err(ctx.err(&loc, "must be a number between 0 and 3600"));
                        }
                        retry.backoff_seconds = n;
                    }
                }
                Some(_) => return Err(ctx.err(format!("{sat}.retry_policy"), "must be a mapping")),
            }
            let timeout_seconds = match get(map, "timeout_seconds") {
                None | Some(Value::Null) => 120.0,
                Some(v) => {
                    let loc = format!("{sat}.timeout_seconds");
                    let n = number(ctx, &loc, v)?;
                    if !(n > 0.0 && n <= 86_400.0) {
                        return Err(ctx.err(&loc, "must be a number > 0 (at most 86400)"));
                    }
                    n
                }
            };
            stages.push(StageDef {
                key,
                skills,
                approval_required,
                retry_policy: retry,
                timeout_seconds,
            });
        }
        Ok(stages)
    }

    pub fn get(&self, mode: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.mode == mode)
    }

    /// Startup check: the foundation mode must exist.
    pub fn check_settings(&self, settings: &ResolveSettings) -> Result<(), String> {
        if self.get(&settings.foundation_mode).is_none() {
            return Err(format!(
                "foundation mode `{}` is not a profile (available: {})",
                settings.foundation_mode,
                self.mode_list()
            ));
        }
        Ok(())
    }

    fn mode_list(&self) -> String {
        self.profiles
            .iter()
            .map(|p| p.mode.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The mode contract: requested mode + overrides → the immutable plan snapshot.
    pub fn resolve(
        &self,
        settings: &ResolveSettings,
        requested_mode: &str,
        overrides: &SkillOverrides,
    ) -> Result<PlanSnapshot, AppError> {
        let requested = requested_mode.trim();
        if requested.is_empty() {
            return Err(AppError::validation("mode must not be empty"));
        }
        if requested.len() > 64 {
            return Err(AppError::validation("mode must be at most 64 characters"));
        }
        let effective = if settings.force_foundation_fallback || self.get(requested).is_none() {
            settings.foundation_mode.as_str()
        } else {
            requested
        };
        let index = self.profiles.iter().position(|p| p.mode == effective);
        let profile = index.map(|i| &self.profiles[i]).ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "foundation mode `{effective}` is not a profile (available: {})",
                self.mode_list()
            ))
        })?;
        let mut stages = profile.stages.clone();
        let mut clean = SkillOverrides::new();
        for (key, skills) in overrides {
            let Some(stage) = stages.iter_mut().find(|s| &s.key == key) else {
                let keys: Vec<&str> = profile.stages.iter().map(|s| s.key.as_str()).collect();
                return Err(AppError::validation(format!(
                    "unknown stage override key `{key}` for mode `{effective}` (stages: {})",
                    keys.join(", ")
                )));
            };
            if skills.is_empty() {
                return Err(AppError::validation(format!(
                    "stage override `{key}` must be a non-empty list"
                )));
            }
            let mut cleaned = Vec::with_capacity(skills.len());
            for skill in skills {
                let s = skill.trim();
                if s.is_empty() {
                    return Err(AppError::validation(format!(
                        "stage override `{key}` contains a blank skill"
                    )));
                }
                cleaned.push(s.to_string());
            }
            stage.skills = cleaned.clone();
            clean.insert(key.clone(), cleaned);
        }
        let profile_digest = match index.and_then(|i| self.digests.get(i)) {
            // Nothing overridden: the resolved profile is the profile.
            Some(known) if clean.is_empty() => known.clone(),
            _ => digest(&Profile {
                mode: profile.mode.clone(),
                description: profile.description.clone(),
                stages: stages.clone(),
            }),
        };
        Ok(PlanSnapshot {
            requested_mode: requested.to_string(),
            effective_mode: effective.to_string(),
            fallback_applied: requested != effective,
            profile_version: self.version.clone(),
            profile_digest,
            description: profile.description.clone(),
            skill_overrides: clean,
            stages,
        })
    }
}

/// sha256 of the profile as canonical JSON (object keys sorted, no whitespace).
pub fn digest(profile: &Profile) -> String {
    let value = serde_json::to_value(profile).unwrap_or(serde_json::Value::Null);
    let text = value.to_string();
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../profiles/workflow_profiles.yaml");

    fn shipped() -> ProfileSet {
        ProfileSet::parse(SHIPPED, "workflow_profiles.yaml").expect("shipped profiles are valid")
    }

    fn forced() -> ResolveSettings {
        ResolveSettings::default()
    }

    fn native() -> ResolveSettings {
        ResolveSettings {
            force_foundation_fallback: false,
            ..ResolveSettings::default()
        }
    }

    fn overrides(pairs: &[(&str, &[&str])]) -> SkillOverrides {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn shipped_file_has_three_profiles_sorted() {
        let set = shipped();
        assert_eq!(set.version, "v1");
        let modes: Vec<_> = set.profiles.iter().map(|p| p.mode.as_str()).collect();
        assert_eq!(modes, ["content_calendar", "foundation_stack", "plan_90d"]);
        let f = set.get("foundation_stack").expect("foundation");
        let keys: Vec<_> = f.stages.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["research", "brand-voice", "positioning", "keywords"]);
        let gates: Vec<_> = f.stages.iter().map(|s| s.approval_required).collect();
        assert_eq!(gates, [false, true, true, true]);
        assert_eq!(f.stages[0].retry_policy.max_attempts, 2);
        assert_eq!(f.stages[0].timeout_seconds, 180.0);
    }

    #[test]
    fn forced_fallback_maps_every_mode_to_foundation() {
        let plan = shipped()
            .resolve(&forced(), "content_calendar", &SkillOverrides::new())
            .expect("resolves");
        assert_eq!(plan.requested_mode, "content_calendar");
        assert_eq!(plan.effective_mode, "foundation_stack");
        assert!(plan.fallback_applied);
        assert_eq!(plan.profile_version, "v1");
        assert_eq!(plan.stages.len(), 4);
    }

    #[test]
    fn requesting_the_foundation_mode_is_not_a_fallback() {
        let plan = shipped()
            .resolve(&forced(), "foundation_stack", &SkillOverrides::new())
            .expect("resolves");
        assert!(!plan.fallback_applied);
    }

    #[test]
    fn unknown_mode_falls_back_when_not_forced() {
        let plan = shipped()
            .resolve(&native(), "no_such_mode", &SkillOverrides::new())
            .expect("resolves");
        assert_eq!(plan.effective_mode, "foundation_stack");
        assert!(plan.fallback_applied);
    }

    #[test]
    fn native_resolution_when_not_forced() {
        let plan = shipped()
            .resolve(&native(), "plan_90d", &SkillOverrides::new())
            .expect("resolves");
        assert_eq!(plan.effective_mode, "plan_90d");
        assert!(!plan.fallback_applied);
        assert_eq!(plan.stages.len(), 3);
    }

    #[test]
    fn override_replaces_skills_of_that_stage_only() {
        let set = shipped();
        let plan = set
            .resolve(
                &native(),
                "plan_90d",
                &overrides(&[("strategy_draft", &[" 04-copy/direct-response "])]),
            )
            .expect("resolves");
        assert_eq!(plan.stages[1].skills, ["04-copy/direct-response"]);
        assert_eq!(plan.stages[0], set.get("plan_90d").expect("p").stages[0]);
        // The profile itself is untouched.
        assert_eq!(set.get("plan_90d").expect("p").stages[1].skills.len(), 2);
        assert_eq!(
            plan.skill_overrides["strategy_draft"],
            ["04-copy/direct-response"]
        );
    }

    #[test]
    fn overrides_are_validated_against_the_effective_profile() {
        let err = shipped()
            .resolve(
                &forced(),
                "plan_90d",
                &overrides(&[("strategy_draft", &["x"])]),
            )
            .expect_err("strategy_draft is not a foundation stage");
        assert!(matches!(&err, AppError::Validation(m) if m.contains("strategy_draft")));
    }

    #[test]
    fn override_errors_name_the_key() {
        let set = shipped();
        for (ov, needle) in [
            (overrides(&[("nope", &["x"])]), "nope"),
            (overrides(&[("research", &[])]), "research"),
            (overrides(&[("keywords", &["ok", "  "])]), "keywords"),
        ] {
            let err = set
                .resolve(&forced(), "x", &ov)
                .expect_err("invalid override");
            assert!(
                matches!(&err, AppError::Validation(m) if m.contains(needle)),
                "{err:?}"
            );
        }
    }

    #[test]
    fn empty_mode_is_a_validation_error() {
        assert!(matches!(
            shipped().resolve(&forced(), "  ", &SkillOverrides::new()),
            Err(AppError::Validation(_))
        ));
    }

    #[test]
    fn missing_foundation_mode_is_a_clear_error() {
        let settings = ResolveSettings {
            force_foundation_fallback: true,
            foundation_mode: "ghost".into(),
        };
        let set = shipped();
        assert!(set
            .check_settings(&settings)
            .expect_err("missing")
            .contains("ghost"));
        assert!(matches!(
            set.resolve(&settings, "plan_90d", &SkillOverrides::new()),
            Err(AppError::Internal(_))
        ));
    }

    #[test]
    fn digest_is_stable_and_tracks_content() {
        let set = shipped();
        let none = SkillOverrides::new();
        let a = set.resolve(&forced(), "a", &none).expect("a");
        let b = set.resolve(&forced(), "b", &none).expect("b");
        assert_eq!(a.profile_digest, b.profile_digest);
        assert_eq!(a.profile_digest.len(), 64);
        // Taken once per profile when it is parsed: the digest of the profile itself.
        let foundation = set.get("foundation_stack").expect("foundation");
        assert_eq!(a.profile_digest, digest(foundation));
        // An override that changes nothing is digested anew, to the same value.
        let research = &foundation.stages[0];
        let skills: Vec<&str> = research.skills.iter().map(String::as_str).collect();
        let same = set
            .resolve(
                &forced(),
                "a",
                &overrides(&[(research.key.as_str(), &skills)]),
            )
            .expect("same");
        assert_eq!(same.profile_digest, a.profile_digest);
        // Same content parsed again, keys in another order: same digest.
        let reordered = SHIPPED.replace(
            "skills: [01-research/research-framework]\n        approval_required: false",
            "approval_required: false\n        skills: [01-research/research-framework]",
        );
        assert_ne!(reordered, SHIPPED);
        let again = ProfileSet::parse(&reordered, "x").expect("valid");
        assert_eq!(
            again
                .resolve(&forced(), "a", &none)
                .expect("a")
                .profile_digest,
            a.profile_digest
        );
        let c = set
            .resolve(&forced(), "a", &overrides(&[("research", &["other"])]))
            .expect("c");
        assert_ne!(a.profile_digest, c.profile_digest);
    }

    fn parse_err(text: &str) -> ProfileError {
        ProfileSet::parse(text, "bad.yaml").expect_err("invalid")
    }

    #[test]
    fn errors_name_file_profile_and_field() {
        let e = parse_err("version: v1\nprofiles:\n  - mode: m\n    stages: [1, 2, 3]\n");
        assert_eq!(e.file, "bad.yaml");
        assert!(
            e.location.contains("profile `m`") && e.location.contains("stages[0]"),
            "{e}"
        );

        let e = parse_err("version: v1\nprofiles:\n  - mode: m\n    stages:\n      - key: s\n        skills: [a]\n        timeout_seconds: 0\n");
        assert!(
            e.location.contains("profile `m`") && e.location.contains("timeout_seconds"),
            "{e}"
        );

        let e = parse_err("version: v1\nprofiles:\n  - mode: m\n    stages:\n      - key: s\n        skills: []\n");
        assert!(e.location.ends_with("skills"), "{e}");

        let e = parse_err("version: v1\nprofiles:\n  - mode: m\n    stages:\n      - key: s\n        skills: [a]\n        retry_policy: {max_attempts: 0}\n");
        assert!(e.location.contains("max_attempts"), "{e}");

        let e = parse_err("version: v1\nprofiles:\n  - mode: m\n    stages:\n      - {key: s, skills: [a]}\n  - mode: m\n    stages:\n      - {key: s, skills: [a]}\n");
        assert!(
            e.location.contains("mode") && e.message.contains("duplicated"),
            "{e}"
        );

        let e = parse_err("version: v1\nprofiles: []\n");
        assert_eq!(e.location, "profiles");
        let e = parse_err("profiles:\n  - mode: m\n    stages: [{key: s, skills: [a]}]\n");
        assert_eq!(e.location, "version");
        let e = parse_err("version: v1\nprofiles: [: :\n");
        assert!(e.message.contains("invalid YAML"));
    }

    #[test]
    fn defaults_apply() {
        let set = ProfileSet::parse(
            "version: v2\nprofiles:\n  - mode: m\n    stages:\n      - {key: s, skills: [a]}\n",
            "x",
        )
        .expect("valid");
        let s = &set.profiles[0].stages[0];
        assert!(!s.approval_required);
        assert_eq!(
            s.retry_policy,
            RetryPolicy {
                max_attempts: 1,
                backoff_seconds: 0.0
            }
        );
        assert_eq!(s.timeout_seconds, 120.0);
    }
}

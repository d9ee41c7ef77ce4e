//! Brands, projects, threads.

use super::{Caller, Services};
use crate::domain::events::DomainEvent;
use crate::domain::{ids, workspace};
use crate::error::AppError;
use crate::store::event_log::NewEvent;
use crate::store::idempotency::Idempotency;
use crate::store::{BrandRow, ProjectRow, ThreadRow};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize)]
pub struct CreateBrand {
    pub brand_id: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpdateBrand {
    pub brand_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateProject {
    pub project_id: Option<String>,
    pub brand_id: String,
    pub name: String,
    pub objective: Option<String>,
    pub channels: Option<Vec<String>>,
    pub due_date: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpdateProject {
    pub project_id: String,
    pub name: Option<String>,
    pub objective: Option<String>,
    pub channels: Option<Vec<String>>,
    /// `Some(None)` clears the due date.
    pub due_date: Option<Option<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateThread {
    pub thread_id: Option<String>,
    pub project_id: String,
    pub title: String,
    pub modes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RenameThread {
    pub thread_id: String,
    pub title: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThreadMode {
    pub thread_id: String,
    pub mode: String,
}

/// What a workspace mutation answers (and what an idempotent replay answers again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntityRef {
    pub id: String,
}

fn new_id(field: &str, given: &Option<String>, prefix: &str) -> Result<String, AppError> {
    match given {
        Some(id) => ids::parse_client_id(field, id),
        None => Ok(ids::generate(prefix)),
    }
}

fn one(body: DomainEvent, thread_id: Option<String>) -> Vec<NewEvent> {
    vec![NewEvent {
        body,
        thread_id,
        run_id: None,
    }]
}

impl Services {
    fn check_mode(&self, raw: &str) -> Result<String, AppError> {
        let mode = workspace::parse_mode(raw)?;
        if self.profiles.get(&mode).is_none() {
            let known: Vec<&str> = self
                .profiles
                .profiles
                .iter()
                .map(|p| p.mode.as_str())
                .collect();
            return Err(AppError::validation(format!(
                "unknown mode `{mode}` (available: {})",
                known.join(", ")
            )));
        }
        Ok(mode)
    }

    #[tracing::instrument(skip_all)]
    pub async fn create_brand(
        &self,
        caller: &Caller,
        cmd: CreateBrand,
        key: Option<String>,
    ) -> Result<BrandRow, AppError> {
        let idem = Idempotency::new("createBrand", key, &cmd)?;
        let name = workspace::parse_name("name", &cmd.name)?;
        let brand_id = new_id("brandId", &cmd.brand_id, "b-")?;
        let mut w = self.store.write().await?;
        let id = match w.replayed::<EntityRef>(&idem).await? {
            Some(r) => r.id,
            None => {
                if self.store.brand(&brand_id).await?.is_some() {
                    return Err(AppError::Conflict(format!(
                        "brand {brand_id} already exists"
                    )));
                }
                w.append_and_project(
                    &format!("brand:{brand_id}"),
                    0,
                    &caller.meta(),
                    one(
                        DomainEvent::BrandCreated {
                            brand_id: brand_id.clone(),
                            name,
                        },
                        None,
                    ),
                    None,
                )
                .await?;
                w.remember(
                    &idem,
                    &EntityRef {
                        id: brand_id.clone(),
                    },
                )
                .await?;
                brand_id
            }
        };
        w.commit().await?;
        self.store
            .brand(&id)
            .await?
            .ok_or_else(|| AppError::not_found("brand", &id))
    }

    #[tracing::instrument(skip_all, fields(brand_id = %cmd.brand_id))]
    pub async fn update_brand(
        &self,
        caller: &Caller,
        cmd: UpdateBrand,
        key: Option<String>,
    ) -> Result<BrandRow, AppError> {
        let idem = Idempotency::new("updateBrand", key, &cmd)?;
        let name = workspace::parse_name("name", &cmd.name)?;
        let mut w = self.store.write().await?;
        if w.replayed::<EntityRef>(&idem).await?.is_none() {
            let brand = self
                .store
                .brand(&cmd.brand_id)
                .await?
                .ok_or_else(|| AppError::not_found("brand", &cmd.brand_id))?;
            if brand.name != name {
                w.append_and_project(
                    &format!("brand:{}", brand.id),
                    brand.version,
                    &caller.meta(),
                    one(
                        DomainEvent::BrandUpdated {
                            brand_id: brand.id.clone(),
                            name,
                        },
                        None,
                    ),
                    None,
                )
                .await?;
            }
            w.remember(&idem, &EntityRef { id: brand.id }).await?;
        }
        w.commit().await?;
        self.store
            .brand(&cmd.brand_id)
            .await?
            .ok_or_else(|| AppError::not_found("brand", &cmd.brand_id))
    }

    #[tracing::instrument(skip_all)]
    pub async fn create_project(
        &self,
        caller: &Caller,
        cmd: CreateProject,
        key: Option<String>,
    ) -> Result<ProjectRow, AppError> {
        let idem = Idempotency::new("createProject", key, &cmd)?;
        let name = workspace::parse_name("name", &cmd.name)?;
        let objective = workspace::parse_text("objective", cmd.objective.as_deref().unwrap_or(""))?;
        let channels = workspace::parse_channels(cmd.channels.as_deref().unwrap_or(&[]))?;
        let due_date = cmd
            .due_date
            .as_deref()
            .map(workspace::parse_due_date)
            .transpose()?;
        let project_id = new_id("projectId", &cmd.project_id, "p-")?;
        let mut w = self.store.write().await?;
        let id = match w.replayed::<EntityRef>(&idem).await? {
            Some(r) => r.id,
            None => {
                let brand = self
                    .store
                    .brand(&cmd.brand_id)
                    .await?
                    .ok_or_else(|| AppError::not_found("brand", &cmd.brand_id))?;
                if self.store.project(&project_id).await?.is_some() {
                    return Err(AppError::Conflict(format!(
                        "project {project_id} already exists"
                    )));
                }
                w.append_and_project(
                    &format!("project:{project_id}"),
                    0,
                    &caller.meta(),
                    one(
                        DomainEvent::ProjectCreated {
                            project_id: project_id.clone(),
                            brand_id: brand.id,
                            name,
                            objective,
                            channels,
                            due_date,
                        },
                        None,
                    ),
                    None,
                )
                .await?;
                w.remember(
                    &idem,
                    &EntityRef {
                        id: project_id.clone(),
                    },
                )
                .await?;
                project_id
            }
        };
        w.commit().await?;
        self.store
            .project(&id)
            .await?
            .ok_or_else(|| AppError::not_found("project", &id))
    }

    #[tracing::instrument(skip_all, fields(project_id = %cmd.project_id))]
    pub async fn update_project(
        &self,
        caller: &Caller,
        cmd: UpdateProject,
        key: Option<String>,
    ) -> Result<ProjectRow, AppError> {
        let idem = Idempotency::new("updateProject", key, &cmd)?;
        let name = cmd
            .name
            .as_deref()
            .map(|n| workspace::parse_name("name", n))
            .transpose()?;
        let objective = cmd
            .objective
            .as_deref()
            .map(|o| workspace::parse_text("objective", o))
            .transpose()?;
        let channels = cmd
            .channels
            .as_deref()
            .map(workspace::parse_channels)
            .transpose()?;
        let due_date = match &cmd.due_date {
            Some(Some(d)) => Some(Some(workspace::parse_due_date(d)?)),
            Some(None) => Some(None),
            None => None,
        };
        let mut w = self.store.write().await?;
        if w.replayed::<EntityRef>(&idem).await?.is_none() {
            let p = self
                .store
                .project(&cmd.project_id)
                .await?
                .ok_or_else(|| AppError::not_found("project", &cmd.project_id))?;
            let event = DomainEvent::ProjectUpdated {
                project_id: p.id.clone(),
                name: name.unwrap_or_else(|| p.name.clone()),
                objective: objective.unwrap_or_else(|| p.objective.clone()),
                channels: channels.unwrap_or_else(|| p.channels.clone()),
                due_date: due_date.unwrap_or_else(|| p.due_date.clone()),
            };
            let unchanged = DomainEvent::ProjectUpdated {
                project_id: p.id.clone(),
                name: p.name.clone(),
                objective: p.objective.clone(),
                channels: p.channels.clone(),
                due_date: p.due_date.clone(),
            };
            if event != unchanged {
                w.append_and_project(
                    &format!("project:{}", p.id),
                    p.version,
                    &caller.meta(),
                    one(event, None),
                    None,
                )
                .await?;
            }
            w.remember(&idem, &EntityRef { id: p.id }).await?;
        }
        w.commit().await?;
        self.store
            .project(&cmd.project_id)
            .await?
            .ok_or_else(|| AppError::not_found("project", &cmd.project_id))
    }

    #[tracing::instrument(skip_all)]
    pub async fn create_thread(
        &self,
        caller: &Caller,
        cmd: CreateThread,
        key: Option<String>,
    ) -> Result<ThreadRow, AppError> {
        let idem = Idempotency::new("createThread", key, &cmd)?;
        let title = workspace::parse_name("title", &cmd.title)?;
        let mut modes: Vec<String> = Vec::new();
        for m in cmd.modes.as_deref().unwrap_or(&[]) {
            let m = self.check_mode(m)?;
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
        let thread_id = new_id("threadId", &cmd.thread_id, "t-")?;
        let mut w = self.store.write().await?;
        let id = match w.replayed::<EntityRef>(&idem).await? {
            Some(r) => r.id,
            None => {
                let project = self
                    .store
                    .project(&cmd.project_id)
                    .await?
                    .ok_or_else(|| AppError::not_found("project", &cmd.project_id))?;
                if self.store.thread(&thread_id).await?.is_some() {
                    return Err(AppError::Conflict(format!(
                        "thread {thread_id} already exists"
                    )));
                }
                w.append_and_project(
                    &format!("thread:{thread_id}"),
                    0,
                    &caller.meta(),
                    one(
                        DomainEvent::ThreadCreated {
                            thread_id: thread_id.clone(),
                            project_id: project.id,
                            brand_id: project.brand_id,
                            title,
                            modes,
                        },
                        Some(thread_id.clone()),
                    ),
                    None,
                )
                .await?;
                w.remember(
                    &idem,
                    &EntityRef {
                        id: thread_id.clone(),
                    },
                )
                .await?;
                thread_id
            }
        };
        w.commit().await?;
        self.store
            .thread(&id)
            .await?
            .ok_or_else(|| AppError::not_found("thread", &id))
    }

    /// Shared shape of the thread updates: load, decide an optional event, append, answer.
    async fn update_thread(
        &self,
        caller: &Caller,
        idem: Idempotency,
        thread_id: &str,
        decide: impl FnOnce(&ThreadRow) -> Option<DomainEvent>,
    ) -> Result<ThreadRow, AppError> {
        let mut w = self.store.write().await?;
        if w.replayed::<EntityRef>(&idem).await?.is_none() {
            let thread = self
                .store
                .thread(thread_id)
                .await?
                .ok_or_else(|| AppError::not_found("thread", thread_id))?;
            if let Some(event) = decide(&thread) {
                w.append_and_project(
                    &format!("thread:{}", thread.id),
                    thread.version,
                    &caller.meta(),
                    one(event, Some(thread.id.clone())),
                    None,
                )
                .await?;
            }
            w.remember(&idem, &EntityRef { id: thread.id }).await?;
        }
        w.commit().await?;
        self.store
            .thread(thread_id)
            .await?
            .ok_or_else(|| AppError::not_found("thread", thread_id))
    }

    #[tracing::instrument(skip_all, fields(thread_id = %cmd.thread_id))]
    pub async fn rename_thread(
        &self,
        caller: &Caller,
        cmd: RenameThread,
        key: Option<String>,
    ) -> Result<ThreadRow, AppError> {
        let idem = Idempotency::new("renameThread", key, &cmd)?;
        let title = workspace::parse_name("title", &cmd.title)?;
        self.update_thread(caller, idem, &cmd.thread_id, |t| {
            (t.title != title).then(|| DomainEvent::ThreadRenamed {
                thread_id: t.id.clone(),
                title,
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(thread_id = %cmd.thread_id))]
    pub async fn add_thread_mode(
        &self,
        caller: &Caller,
        cmd: ThreadMode,
        key: Option<String>,
    ) -> Result<ThreadRow, AppError> {
        let idem = Idempotency::new("addThreadMode", key, &cmd)?;
        let mode = self.check_mode(&cmd.mode)?;
        self.update_thread(caller, idem, &cmd.thread_id, |t| {
            (!t.modes.contains(&mode)).then(|| DomainEvent::ThreadModeAdded {
                thread_id: t.id.clone(),
                mode,
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(thread_id = %cmd.thread_id))]
    pub async fn remove_thread_mode(
        &self,
        caller: &Caller,
        cmd: ThreadMode,
        key: Option<String>,
    ) -> Result<ThreadRow, AppError> {
        let idem = Idempotency::new("removeThreadMode", key, &cmd)?;
        let mode = workspace::parse_mode(&cmd.mode)?;
        self.update_thread(caller, idem, &cmd.thread_id, |t| {
            t.modes
                .contains(&mode)
                .then(|| DomainEvent::ThreadModeRemoved {
                    thread_id: t.id.clone(),
                    mode,
                })
        })
        .await
    }
}

// vm-workflow console: one page, GraphQL over HTTP for reads and commands, `graphql-transport-ws`
// for live updates. No dependencies and no build step.
"use strict";

(() => {
  const ACTOR_ID = "console";
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELED"]);
  const PING_EVERY_MS = 10000;
  const PONG_TIMEOUT_MS = 8000;
  const ACK_TIMEOUT_MS = 10000;

  // ------------------------------------------------------------------ small DOM helpers

  const $ = (selector) => document.querySelector(selector);

  /** Create an element: `class`, `text`, `on<event>` handlers, anything else as an attribute. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2), value);
      } else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false || child === "") continue;
      node.append(child);
    }
    return node;
  }

  function fillSelect(select, items, label, selected, placeholder) {
    select.replaceChildren(
      el("option", { value: "", text: items.length ? placeholder : "(none yet)" }),
      ...items.map((item) => el("option", { value: item.id, text: label(item) })),
    );
    select.value = selected || "";
  }

  function setBadge(node, status) {
    node.textContent = status || "";
    node.dataset.status = status || "";
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleTimeString();
  }

  function fmtSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    return `${(bytes / 1024).toFixed(1)} KiB`;
  }

  // ------------------------------------------------------------------ errors

  class GraphQLError extends Error {
    constructor(errors) {
      super(errors.map((e) => e.message).join("; ") || "request failed");
      this.errors = errors;
      const first = errors[0] || {};
      this.code = (first.extensions && first.extensions.code) || null;
    }
  }

  function formatError(err) {
    if (err instanceof GraphQLError) {
      return err.errors
        .map((e) => {
          const code = e.extensions && e.extensions.code;
          return code ? `${e.message} [${code}]` : e.message;
        })
        .join("\n");
    }
    return String((err && err.message) || err);
  }

  const target = (where) => (typeof where === "string" ? $(where) : where);

  function showError(where, err) {
    const node = target(where);
    if (!node) return;
    node.textContent = formatError(err);
    node.hidden = false;
    if (err instanceof GraphQLError && err.code) node.dataset.code = err.code;
    else delete node.dataset.code;
  }

  function clearError(where) {
    const node = target(where);
    if (!node) return;
    node.textContent = "";
    node.hidden = true;
    delete node.dataset.code;
  }

  /** Run a user action: its errors go to `errorTarget`, its buttons are disabled meanwhile. */
  async function act(buttons, errorTarget, fn) {
    const list = (Array.isArray(buttons) ? buttons : [buttons]).filter(Boolean);
    clearError(errorTarget);
    for (const b of list) b.disabled = true;
    try {
      return await fn();
    } catch (err) {
      console.error(err);
      showError(errorTarget, err);
      return undefined;
    } finally {
      for (const b of list) b.disabled = false;
    }
  }

  // ------------------------------------------------------------------ GraphQL over HTTP

  async function gql(query, variables) {
    let response;
    try {
      response = await fetch("/graphql", {
        method: "POST",
        headers: {
          "content-type": "application/json",
          accept: "application/json",
          "x-actor-id": ACTOR_ID,
        },
        body: JSON.stringify({ query, variables: variables || {} }),
      });
    } catch (err) {
      throw new GraphQLError([
        { message: `network error: ${err.message}`, extensions: { code: "NETWORK" } },
      ]);
    }
    let body;
    try {
      body = await response.json();
    } catch {
      throw new GraphQLError([
        {
          message: `HTTP ${response.status} ${response.statusText}`.trim(),
          extensions: { code: `HTTP_${response.status}` },
        },
      ]);
    }
    if (body.errors && body.errors.length) throw new GraphQLError(body.errors);
    if (!response.ok) {
      throw new GraphQLError([
        { message: `HTTP ${response.status}`, extensions: { code: `HTTP_${response.status}` } },
      ]);
    }
    return body.data;
  }

  // ------------------------------------------------------------------ graphql-transport-ws client

  /**
   * One WebSocket, many subscriptions. Reconnects with backoff; on every (re)connection each live
   * subscription is sent again with the variables it computes then (its `afterSequence` cursor).
   */
  class SubscriptionClient {
    constructor(url, onState) {
      this.url = url;
      this.onState = onState;
      this.subs = new Map();
      this.nextId = 1;
      this.ws = null;
      this.acked = false;
      this.attempt = 0;
      this.timers = {};
      this.connect();
    }

    setState(name, delay) {
      this.state = name;
      this.onState(name, delay);
    }

    clearTimers() {
      for (const t of Object.values(this.timers)) clearTimeout(t);
      this.timers = {};
    }

    connect() {
      this.clearTimers();
      this.setState(this.attempt === 0 && !this.everConnected ? "connecting" : "reconnecting");
      let ws;
      try {
        ws = new WebSocket(this.url, "graphql-transport-ws");
      } catch (err) {
        console.error(err);
        this.scheduleReconnect();
        return;
      }
      this.ws = ws;
      this.acked = false;
      ws.onopen = () => {
        this.send(ws, { type: "connection_init", payload: { actorId: ACTOR_ID } });
      };
      ws.onmessage = (event) => this.handle(ws, event.data);
      ws.onerror = () => {
        /* `close` follows */
      };
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.acked = false;
        this.scheduleReconnect();
      };
      this.timers.ack = setTimeout(() => {
        if (this.ws === ws && !this.acked) ws.close(4408, "connection_ack timeout");
      }, ACK_TIMEOUT_MS);
    }

    scheduleReconnect() {
      this.clearTimers();
      this.attempt += 1;
      const base = Math.min(10000, 500 * 2 ** Math.min(this.attempt - 1, 5));
      const delay = Math.round(base * (0.8 + Math.random() * 0.4));
      this.setState("reconnecting", delay);
      this.timers.reconnect = setTimeout(() => this.connect(), delay);
    }

    /** Close the socket as a network failure would (used by tests and the "reconnect" hook). */
    drop() {
      if (this.ws) this.ws.close(4000, "dropped by client");
    }

    send(ws, message) {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
    }

    keepAlive(ws) {
      clearTimeout(this.timers.ping);
      this.timers.ping = setTimeout(() => {
        if (this.ws !== ws) return;
        this.send(ws, { type: "ping" });
        this.timers.pong = setTimeout(() => {
          if (this.ws === ws) ws.close(4504, "pong timeout");
        }, PONG_TIMEOUT_MS);
        this.keepAlive(ws);
      }, PING_EVERY_MS);
    }

    handle(ws, raw) {
      if (this.ws !== ws) return;
      let msg;
      try {
        msg = JSON.parse(raw);
      } catch {
        return;
      }
      const sub = msg.id !== undefined ? this.subs.get(msg.id) : undefined;
      switch (msg.type) {
        case "connection_ack":
          clearTimeout(this.timers.ack);
          this.acked = true;
          this.attempt = 0;
          this.everConnected = true;
          this.setState("connected");
          this.keepAlive(ws);
          for (const s of this.subs.values()) this.sendSubscribe(s);
          break;
        case "ping":
          this.send(ws, msg.payload === undefined ? { type: "pong" } : { type: "pong", payload: msg.payload });
          break;
        case "pong":
          clearTimeout(this.timers.pong);
          break;
        case "next":
          if (!sub) return;
          if (msg.payload && msg.payload.errors && msg.payload.errors.length) {
            sub.onError(new GraphQLError(msg.payload.errors));
          } else if (msg.payload && msg.payload.data) {
            sub.onData(msg.payload.data);
          }
          break;
        case "error":
          if (!sub) return;
          this.subs.delete(msg.id);
          sub.onError(new GraphQLError(Array.isArray(msg.payload) ? msg.payload : [msg.payload || {}]));
          break;
        case "complete":
          // The server ended a stream we still want (for example after an error): pick it up
          // again from its cursor a little later.
          if (!sub) return;
          setTimeout(() => {
            if (this.subs.get(msg.id) === sub && this.acked && this.ws === ws) this.sendSubscribe(sub);
          }, 1000);
          break;
        default:
          break;
      }
    }

    sendSubscribe(sub) {
      this.send(this.ws, {
        id: sub.id,
        type: "subscribe",
        payload: { query: sub.query, variables: sub.variables() },
      });
    }

    /** Start a subscription; returns a function that stops it. */
    subscribe({ query, variables, onData, onError }) {
      const id = String(this.nextId++);
      const sub = { id, query, variables, onData, onError };
      this.subs.set(id, sub);
      if (this.acked) this.sendSubscribe(sub);
      return () => {
        if (this.subs.delete(id) && this.acked) this.send(this.ws, { id, type: "complete" });
      };
    }
  }

  // ------------------------------------------------------------------ GraphQL documents

  const RUN_SUMMARY = `fragment RunSummary on WorkflowRun {
    id threadId status requestedMode effectiveMode fallbackApplied createdAt }`;

  const RUN_DETAIL = `fragment RunDetail on WorkflowRun {
    id threadId status requestText requestedMode effectiveMode fallbackApplied profileVersion
    profileDigest currentStage createdAt updatedAt startedAt finishedAt
    skillOverrides { stageKey skills }
    pendingApprovals { id stageKey status }
    stages {
      key position status attempts approvalRequired skills errorCode errorMessage retryable
      startedAt finishedAt
      retryPolicy { maxAttempts backoffSeconds }
      approval { id stageKey status requiredRole reason requestedAt decidedAt decidedBy comment }
      artifacts { path kind size sha256 attempt }
    } }`;

  const Q = {
    profiles: `{ workflowProfiles { version foundationMode forceFoundationFallback
      profiles { mode description stages { key approvalRequired skills } } } }`,
    brands: `{ brands(first: 100) { nodes { id name } } }`,
    projects: `query($id: ID!) { brand(id: $id) { id projects(first: 100) { nodes { id name } } } }`,
    threads: `query($id: ID!) { project(id: $id) { id threads(first: 100) { nodes { id title } } } }`,
    threadRef: `query($id: ID!) { thread(id: $id) { id brandId projectId } }`,
    thread: `query($id: ID!) { thread(id: $id) { id title modes brandId projectId
      runs(first: 100) { nodes { ...RunSummary } } } } ${RUN_SUMMARY}`,
    run: `query($id: ID!) { workflowRun(id: $id) { ...RunDetail } } ${RUN_DETAIL}`,
    artifacts: `query($id: ID!) { workflowRun(id: $id) { id
      stages { key artifacts { path kind size sha256 content } } } }`,
    preview: `query($mode: String!, $overrides: [SkillOverrideInput!]) {
      previewWorkflowRun(mode: $mode, skillOverrides: $overrides) {
        requestedMode effectiveMode fallbackApplied profileVersion profileDigest description
        skillOverrides { stageKey skills }
        stages { key approvalRequired skills timeoutSeconds retryPolicy { maxAttempts } } } }`,
  };

  const M = {
    createBrand: `mutation($input: CreateBrandInput!) { createBrand(input: $input) { brand { id name } } }`,
    createProject: `mutation($input: CreateProjectInput!) {
      createProject(input: $input) { project { id name } } }`,
    createThread: `mutation($input: CreateThreadInput!) {
      createThread(input: $input) { thread { id title } } }`,
    addMode: `mutation($input: ThreadModeInput!) { addThreadMode(input: $input) { thread { id modes } } }`,
    removeMode: `mutation($input: ThreadModeInput!) {
      removeThreadMode(input: $input) { thread { id modes } } }`,
    start: `mutation($input: StartWorkflowRunInput!) {
      startWorkflowRun(input: $input) { run { ...RunSummary } } } ${RUN_SUMMARY}`,
    approve: `mutation($input: ApproveWorkflowRunInput!) {
      approveWorkflowRun(input: $input) { resumeApplied run { id status } } }`,
    reject: `mutation($input: RejectWorkflowRunInput!) {
      rejectWorkflowRun(input: $input) { run { id status } } }`,
    cancel: `mutation($input: CancelWorkflowRunInput!) {
      cancelWorkflowRun(input: $input) { run { id status } } }`,
    resume: `mutation($input: ResumeWorkflowRunInput!) {
      resumeWorkflowRun(input: $input) { resumeApplied run { id status } } }`,
  };

  const S = {
    status: `subscription($threadId: ID!, $after: Int) {
      workflowRunStatusChanged(threadId: $threadId, afterSequence: $after) {
        sequence runId fromStatus toStatus stageKey run { ...RunSummary } } } ${RUN_SUMMARY}`,
    events: `subscription($runId: ID!, $after: Int) {
      workflowRunEvents(runId: $runId, afterSequence: $after) {
        sequence type occurredAt actor { id type } payload } }`,
  };

  // ------------------------------------------------------------------ state

  const state = {
    profiles: null,
    brands: [],
    brandId: null,
    projects: [],
    projectId: null,
    threads: [],
    threadId: null,
    thread: null,
    runs: new Map(),
    statusSeq: 0,
    stopStatus: null,
    runId: null,
    run: null,
    eventSeq: 0,
    eventCount: 0,
    stopEvents: null,
    commentDrafts: new Map(),
    connectionLog: [],
    gen: { brand: 0, project: 0, thread: 0, run: 0 },
  };

  let client = null;

  function setConnection(name, delay) {
    const node = $("#conn-status");
    if (state.connectionLog.at(-1) !== name) state.connectionLog.push(name);
    node.dataset.state = name;
    if (name === "connected") node.textContent = "connected";
    else if (name === "connecting") node.textContent = "connecting…";
    else node.textContent = delay ? `reconnecting (retry in ${Math.ceil(delay / 1000)} s)` : "reconnecting…";
    if (name === "connected" && state.runId) refreshRun();
  }

  function updateHash() {
    const params = new URLSearchParams();
    if (state.threadId) params.set("thread", state.threadId);
    if (state.runId) params.set("run", state.runId);
    const hash = params.toString();
    history.replaceState(null, "", hash ? `#${hash}` : location.pathname + location.search);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return { threadId: params.get("thread") || null, runId: params.get("run") || null };
  }

  const pick = (list, preferred) =>
    preferred && list.some((x) => x.id === preferred) ? preferred : list.length ? list[0].id : null;

  // ------------------------------------------------------------------ workspace

  async function loadProfiles() {
    const d = await gql(Q.profiles);
    state.profiles = d.workflowProfiles;
    const select = $("#run-mode");
    const current = select.value;
    select.replaceChildren(
      ...state.profiles.profiles.map((p) =>
        el("option", { value: p.mode, text: `${p.mode} · ${p.description}` }),
      ),
    );
    select.value = state.profiles.profiles.some((p) => p.mode === current)
      ? current
      : state.profiles.foundationMode;
    renderThread();
    schedulePreview(0);
  }

  async function loadBrands(preferred) {
    const d = await gql(Q.brands);
    state.brands = d.brands.nodes;
    const id = pick(state.brands, preferred || state.brandId);
    fillSelect($("#brand-select"), state.brands, (b) => b.name, id, "— choose a brand —");
    return id;
  }

  async function selectBrand(id, hint = {}) {
    const gen = ++state.gen.brand;
    state.brandId = id || null;
    $("#brand-select").value = state.brandId || "";
    let projects = [];
    if (state.brandId) {
      const d = await gql(Q.projects, { id: state.brandId });
      if (gen !== state.gen.brand) return;
      projects = d.brand ? d.brand.projects.nodes : [];
    }
    state.projects = projects;
    const projectId = pick(projects, hint.projectId);
    fillSelect($("#project-select"), projects, (p) => p.name, projectId, "— choose a project —");
    await selectProject(projectId, hint);
  }

  async function selectProject(id, hint = {}) {
    const gen = ++state.gen.project;
    state.projectId = id || null;
    $("#project-select").value = state.projectId || "";
    let threads = [];
    if (state.projectId) {
      const d = await gql(Q.threads, { id: state.projectId });
      if (gen !== state.gen.project) return;
      threads = d.project ? d.project.threads.nodes : [];
    }
    state.threads = threads;
    const threadId = pick(threads, hint.threadId);
    fillSelect($("#thread-select"), threads, (t) => t.title, threadId, "— choose a thread —");
    await selectThread(threadId, hint);
  }

  async function selectThread(id, hint = {}) {
    const gen = ++state.gen.thread;
    if (state.stopStatus) state.stopStatus();
    state.stopStatus = null;
    state.threadId = id || null;
    state.thread = null;
    state.runs = new Map();
    state.statusSeq = 0;
    $("#thread-select").value = state.threadId || "";
    clearError("#run-list-error");
    renderThread();
    renderRunList();
    if (!state.threadId) {
      await selectRun(null);
      return;
    }
    // The log's head first, then the state: subscribing from that head misses nothing and
    // replays none of the thread's older history.
    const head = await gql("query { eventHead }", {});
    if (gen !== state.gen.thread) return;
    const d = await gql(Q.thread, { id: state.threadId });
    if (gen !== state.gen.thread) return;
    if (!d.thread) throw new Error(`thread ${id} not found`);
    state.statusSeq = head.eventHead;
    state.thread = d.thread;
    for (const run of d.thread.runs.nodes) upsertRun(run);
    if (d.thread.modes.length && state.profiles) {
      const first = d.thread.modes.find((m) => state.profiles.profiles.some((p) => p.mode === m));
      if (first && $("#run-mode").value !== first) {
        $("#run-mode").value = first;
        schedulePreview(0);
      }
    }
    renderThread();
    renderRunList();
    startStatusSubscription(state.threadId);
    await selectRun(hint.runId || null);
  }

  function renderThread() {
    const t = state.thread;
    const modes = t ? t.modes : [];
    $("#thread-modes").replaceChildren(
      ...modes.map((mode) =>
        el(
          "li",
          { "data-testid": `mode-${mode}` },
          mode,
          el("button", {
            type: "button",
            class: "secondary",
            title: `Remove mode ${mode}`,
            "aria-label": `Remove mode ${mode}`,
            "data-testid": `mode-remove-${mode}`,
            text: "×",
            onclick: (e) => act(e.currentTarget, "#mode-error", () => changeMode("remove", mode)),
          }),
        ),
      ),
    );
    if (t && !modes.length) $("#thread-modes").append(el("li", { class: "muted", text: "no modes" }));
    const available = state.profiles
      ? state.profiles.profiles.map((p) => p.mode).filter((m) => !modes.includes(m))
      : [];
    const addSelect = $("#mode-add-select");
    addSelect.replaceChildren(...available.map((m) => el("option", { value: m, text: m })));
    addSelect.disabled = !t || !available.length;
    $("#runs-thread-label").textContent = t ? `of “${t.title}”` : "";
  }

  async function changeMode(kind, mode) {
    if (!state.thread) throw new Error("Select or create a thread first.");
    if (!mode) throw new Error("Pick a mode to add.");
    const d = await gql(kind === "add" ? M.addMode : M.removeMode, {
      input: { threadId: state.thread.id, mode },
    });
    const updated = kind === "add" ? d.addThreadMode.thread : d.removeThreadMode.thread;
    if (state.thread && state.thread.id === updated.id) state.thread.modes = updated.modes;
    renderThread();
  }

  async function createBrand() {
    const d = await gql(M.createBrand, { input: { name: $("#brand-name").value } });
    $("#brand-name").value = "";
    const id = d.createBrand.brand.id;
    await loadBrands(id);
    await selectBrand(id);
  }

  async function createProject() {
    if (!state.brandId) throw new Error("Select or create a brand first.");
    const d = await gql(M.createProject, {
      input: { brandId: state.brandId, name: $("#project-name").value },
    });
    $("#project-name").value = "";
    await selectBrand(state.brandId, { projectId: d.createProject.project.id });
  }

  async function createThread() {
    if (!state.projectId) throw new Error("Select or create a project first.");
    const d = await gql(M.createThread, {
      input: { projectId: state.projectId, title: $("#thread-title").value },
    });
    $("#thread-title").value = "";
    await selectProject(state.projectId, { threadId: d.createThread.thread.id });
  }

  // ------------------------------------------------------------------ runs of the thread

  function upsertRun(summary) {
    const old = state.runs.get(summary.id) || {};
    state.runs.set(summary.id, { ...old, ...summary });
  }

  const runLine = (r) => `${r.id} (${r.status}) ${r.requestedMode} → ${r.effectiveMode}`;

  function renderRunList() {
    const runs = [...state.runs.values()].sort(
      (a, b) => (b.createdAt || "").localeCompare(a.createdAt || "") || b.id.localeCompare(a.id),
    );
    const open = (id) => act(null, "#run-list-error", () => selectRun(id));
    $("#run-list").replaceChildren(
      ...runs.map((r) =>
        el(
          "li",
          {
            "data-testid": "run-item",
            "data-run-id": r.id,
            "data-status": r.status,
            class: r.id === state.runId ? "selected" : "",
            role: "button",
            tabindex: "0",
            title: r.fallbackApplied ? "fallback applied" : "",
            onclick: () => open(r.id),
            onkeydown: (e) => {
              if (e.key === "Enter" || e.key === " ") {
                e.preventDefault();
                open(r.id);
              }
            },
          },
          runLine(r),
        ),
      ),
    );
    $("#run-list-empty").hidden = !state.threadId || runs.length > 0;
  }

  function startStatusSubscription(threadId) {
    state.stopStatus = client.subscribe({
      query: S.status,
      variables: () => ({ threadId, after: state.statusSeq }),
      onData: (data) => {
        if (state.threadId !== threadId) return;
        const change = data.workflowRunStatusChanged;
        if (change.sequence <= state.statusSeq) return;
        state.statusSeq = change.sequence;
        if (change.run) upsertRun(change.run);
        else if (state.runs.has(change.runId)) state.runs.get(change.runId).status = change.toStatus;
        clearError("#run-list-error");
        renderRunList();
        if (change.runId === state.runId) refreshRun();
      },
      onError: (err) => showError("#run-list-error", err),
    });
  }

  // ------------------------------------------------------------------ start a run

  let previewTimer = null;
  let previewSeq = 0;

  function schedulePreview(delay = 250) {
    clearTimeout(previewTimer);
    previewTimer = setTimeout(runPreview, delay);
  }

  function profileStages(mode) {
    const profile = state.profiles && state.profiles.profiles.find((p) => p.mode === mode);
    return profile ? profile.stages : [];
  }

  /** One input per stage of the plan that will run; values survive when the stages stay. */
  function renderOverrideInputs(requestedMode, effectiveMode) {
    const box = $("#run-overrides");
    const stages = profileStages(effectiveMode);
    const keys = stages.map((s) => s.key).join("\n");
    box.dataset.requested = requestedMode;
    if (box.dataset.keys === keys) return;
    const previous = new Map([...box.querySelectorAll("input")].map((i) => [i.dataset.stage, i.value]));
    box.dataset.keys = keys;
    box.replaceChildren(
      ...stages.map((s) =>
        el(
          "label",
          { class: "override" },
          el("span", { text: s.key }),
          el("input", {
            "data-stage": s.key,
            "data-testid": `override-${s.key}`,
            placeholder: s.skills.join(", "),
            value: previous.get(s.key) || "",
            oninput: () => schedulePreview(),
          }),
        ),
      ),
    );
  }

  function collectOverrides() {
    return [...$("#run-overrides").querySelectorAll("input")]
      .map((input) => ({
        stageKey: input.dataset.stage,
        skills: input.value
          .split(",")
          .map((s) => s.trim())
          .filter(Boolean),
      }))
      .filter((o) => o.skills.length);
  }

  async function runPreview() {
    const seq = ++previewSeq;
    const mode = $("#run-mode").value;
    if (!mode) return;
    try {
      let plan = null;
      if ($("#run-overrides").dataset.requested !== mode) {
        // A new mode: learn which plan runs, then offer its stages for overrides.
        plan = (await gql(Q.preview, { mode, overrides: [] })).previewWorkflowRun;
        if (seq !== previewSeq) return;
        renderOverrideInputs(mode, plan.effectiveMode);
        if (collectOverrides().length) plan = null;
      }
      if (!plan) {
        plan = (await gql(Q.preview, { mode, overrides: collectOverrides() })).previewWorkflowRun;
        if (seq !== previewSeq) return;
      }
      clearError("#preview-error");
      renderPreview(plan);
    } catch (err) {
      if (seq === previewSeq) showError("#preview-error", err);
    }
  }

  function renderPreview(plan) {
    const overridden = new Set(plan.skillOverrides.map((o) => o.stageKey));
    $("#run-preview").replaceChildren(
      el(
        "div",
        {},
        el("strong", {
          "data-testid": "preview-modes",
          text: `${plan.requestedMode} → ${plan.effectiveMode}`,
        }),
        el("span", { class: "muted", text: ` · profile ${plan.profileVersion} · ${plan.description}` }),
      ),
      el(
        "ol",
        {},
        ...plan.stages.map((s) =>
          el(
            "li",
            { "data-testid": `preview-stage-${s.key}` },
            el("code", { text: s.key }),
            " ",
            el("span", {
              class: overridden.has(s.key) ? "overridden" : "muted",
              text: s.skills.join(", ") + (overridden.has(s.key) ? " (override)" : ""),
            }),
            s.approvalRequired ? el("span", { class: "gate", text: " · approval gate" }) : null,
          ),
        ),
      ),
    );
    const notice = $("#fallback-notice");
    if (plan.fallbackApplied || plan.requestedMode !== plan.effectiveMode) {
      const forced = state.profiles && state.profiles.forceFoundationFallback;
      notice.textContent =
        `Fallback: ${plan.requestedMode} was requested, but ${plan.effectiveMode} will run` +
        (forced ? " (the server forces the foundation fallback)." : ".");
      notice.hidden = false;
    } else {
      notice.textContent = "";
      notice.hidden = true;
    }
  }

  async function startRun() {
    if (!state.threadId) throw new Error("Select or create a thread first.");
    const mode = $("#run-mode").value;
    const overrides = $("#run-overrides").dataset.requested === mode ? collectOverrides() : [];
    const d = await gql(M.start, {
      input: {
        threadId: state.threadId,
        mode,
        requestText: $("#run-request").value,
        skillOverrides: overrides,
      },
    });
    const run = d.startWorkflowRun.run;
    if (run.threadId === state.threadId) upsertRun(run);
    renderRunList();
    await selectRun(run.id);
  }

  // ------------------------------------------------------------------ one run

  async function selectRun(id) {
    ++state.gen.run;
    if (state.stopEvents) state.stopEvents();
    state.stopEvents = null;
    state.runId = id || null;
    state.run = null;
    state.eventSeq = 0;
    state.eventCount = 0;
    $("#run-events").replaceChildren();
    $("#stages").replaceChildren();
    delete $("#stages").dataset.runId;
    closeArtifact();
    for (const e of ["#run-action-error", "#run-detail-error", "#run-events-error", "#artifact-error"]) {
      clearError(e);
    }
    $("#run-action-note").textContent = "";
    updateHash();
    renderRunList();
    renderRunDetail();
    if (!state.runId) return;
    startEventSubscription(state.runId);
    await refreshRun();
  }

  let refreshing = null;
  let refreshAgain = false;

  /** Reload the selected run; calls made meanwhile coalesce into one more reload. */
  function refreshRun() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      try {
        do {
          refreshAgain = false;
          await loadRun();
        } while (refreshAgain);
      } catch (err) {
        showError("#run-detail-error", err);
      } finally {
        refreshing = null;
      }
    })();
    return refreshing;
  }

  async function loadRun() {
    const id = state.runId;
    const gen = state.gen.run;
    if (!id) return;
    const d = await gql(Q.run, { id });
    if (gen !== state.gen.run) return;
    if (!d.workflowRun) throw new Error(`run ${id} not found`);
    state.run = d.workflowRun;
    if (state.run.threadId === state.threadId) upsertRun(state.run);
    clearError("#run-detail-error");
    renderRunList();
    renderRunDetail();
  }

  function startEventSubscription(runId) {
    state.stopEvents = client.subscribe({
      query: S.events,
      variables: () => ({ runId, after: state.eventSeq }),
      onData: (data) => {
        if (state.runId !== runId) return;
        const ev = data.workflowRunEvents;
        if (ev.sequence <= state.eventSeq) return;
        state.eventSeq = ev.sequence;
        clearError("#run-events-error");
        appendEvent(ev);
        refreshRun();
      },
      onError: (err) => showError("#run-events-error", err),
    });
  }

  function appendEvent(ev) {
    const list = $("#run-events");
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    const p = ev.payload || {};
    const bits = [];
    if (p.stageKey) bits.push(p.stageKey);
    if (p.attempt) bits.push(`attempt ${p.attempt}`);
    if (p.errorCode) bits.push(p.errorCode);
    if (p.comment) bits.push(`“${p.comment}”`);
    state.eventCount += 1;
    list.append(
      el(
        "li",
        { "data-testid": "event", "data-seq": ev.sequence, "data-type": ev.type },
        el("span", { class: "seq", text: `#${ev.sequence}` }),
        el("span", { class: "muted", text: `${fmtTime(ev.occurredAt)} ` }),
        el("span", { class: "type", text: ev.type }),
        bits.length ? ` ${bits.join(" · ")}` : null,
        el("span", { class: "muted", text: ` by ${ev.actor.type}:${ev.actor.id} ` }),
        el("details", {}, el("summary", { text: "payload" }), el("pre", { text: JSON.stringify(p, null, 2) })),
      ),
    );
    $("#run-events").dataset.count = String(state.eventCount);
    $("#run-events").dataset.lastSeq = String(ev.sequence);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function renderRunDetail() {
    $("#run-detail-empty").hidden = Boolean(state.runId);
    $("#run-detail").hidden = !state.runId;
    const run = state.run;
    if (!run) {
      $("#run-id").textContent = state.runId || "";
      setBadge($("#run-status"), "");
      return;
    }
    $("#run-id").textContent = run.id;
    setBadge($("#run-status"), run.status);
    $("#run-current-stage").textContent =
      run.currentStage && !TERMINAL.has(run.status) ? ` at ${run.currentStage}` : "";
    $("#run-modes").textContent = `${run.requestedMode} → ${run.effectiveMode}`;
    $("#run-profile").textContent = `${run.profileVersion} · ${run.profileDigest.slice(0, 12)}`;
    const fallback = $("#run-fallback");
    fallback.textContent = run.fallbackApplied
      ? `applied: ${run.requestedMode} was requested, ${run.effectiveMode} runs`
      : "no";
    fallback.className = run.fallbackApplied ? "notice" : "";
    fallback.dataset.applied = String(run.fallbackApplied);
    $("#run-request-text").textContent = run.requestText;
    $("#run-skill-overrides").textContent = run.skillOverrides.length
      ? run.skillOverrides.map((o) => `${o.stageKey}: ${o.skills.join(", ")}`).join("; ")
      : "none";
    const terminal = TERMINAL.has(run.status);
    $("#run-cancel").disabled = terminal;
    $("#run-resume").disabled = terminal;
    renderStages(run);
  }

  function renderStages(run) {
    const box = $("#stages");
    if (box.dataset.runId !== run.id) {
      box.replaceChildren();
      box.dataset.runId = run.id;
    }
    for (const stage of run.stages) {
      let card = box.querySelector(`[data-stage="${CSS.escape(stage.key)}"]`);
      if (!card) {
        card = stageCard(stage);
        box.append(card);
      }
      updateStageCard(card, stage, run);
    }
  }

  function stageCard(stage) {
    return el(
      "div",
      { class: "stage", "data-stage": stage.key, "data-testid": `stage-${stage.key}` },
      el(
        "div",
        { class: "stage-head" },
        el("span", { class: "muted", text: `${stage.position}.` }),
        el("span", { class: "stage-key", text: stage.key }),
        el("span", { class: "badge", "data-field": "status", "data-testid": `stage-status-${stage.key}` }),
        el("span", { class: "stage-meta", "data-field": "meta" }),
      ),
      el("div", { class: "stage-meta", "data-field": "skills" }),
      el("div", { class: "stage-error", "data-field": "error", "data-testid": `stage-error-${stage.key}` }),
      el("div", { "data-field": "approval" }),
      el("ul", { class: "artifacts", "data-field": "artifacts" }),
    );
  }

  function updateStageCard(card, stage, run) {
    const field = (name) => card.querySelector(`[data-field="${name}"]`);
    card.dataset.status = stage.status;
    card.dataset.attempts = String(stage.attempts);
    card.dataset.retryable = String(stage.retryable);
    setBadge(field("status"), stage.status);
    const max = stage.retryPolicy ? stage.retryPolicy.maxAttempts : "?";
    field("meta").textContent =
      `attempts ${stage.attempts}/${max}` + (stage.approvalRequired ? " · approval gate" : "");
    field("skills").textContent = `skills: ${stage.skills.join(", ") || "none"}`;

    const error = field("error");
    if (stage.errorCode) {
      error.replaceChildren(
        el("strong", { "data-testid": `stage-error-code-${stage.key}`, text: stage.errorCode }),
        `: ${stage.errorMessage || ""} `,
        el("span", { text: `(retryable: ${stage.retryable ? "yes" : "no"})` }),
      );
      error.hidden = false;
    } else {
      error.replaceChildren();
      error.hidden = true;
    }

    const approval = stage.approval;
    const approvalBox = field("approval");
    const key = approval ? `${approval.id}:${approval.status}` : stage.approvalRequired ? "gate" : "none";
    if (approvalBox.dataset.key !== key) {
      approvalBox.dataset.key = key;
      approvalBox.replaceChildren(...approvalView(run.id, stage, approval));
      approvalBox.className = approval ? `approval${approval.status === "PENDING" ? "" : " decided"}` : "";
      approvalBox.hidden = key === "none";
    }

    const artifacts = field("artifacts");
    const paths = stage.artifacts.map((a) => `${a.path}@${a.sha256}`).join("\n");
    if (artifacts.dataset.key !== paths) {
      artifacts.dataset.key = paths;
      artifacts.replaceChildren(
        ...stage.artifacts.map((a) =>
          el(
            "li",
            {},
            el("button", {
              type: "button",
              class: "link",
              "data-testid": `artifact-${a.path}`,
              "data-path": a.path,
              text: a.path,
              onclick: () => openArtifact(stage.key, a.path),
            }),
            el("span", { class: "muted", text: ` ${fmtSize(a.size)}` }),
          ),
        ),
      );
    }
  }

  function approvalView(runId, stage, approval) {
    if (!approval) {
      return stage.approvalRequired
        ? [el("span", { class: "muted", text: "Approval gate, not reached yet." })]
        : [];
    }
    if (approval.status !== "PENDING") {
      const who = approval.decidedBy ? ` by ${approval.decidedBy}` : "";
      const when = approval.decidedAt ? ` at ${fmtTime(approval.decidedAt)}` : "";
      return [
        el("span", { class: "badge", "data-status": approval.status, text: approval.status }),
        el("span", { text: `${who}${when}` }),
        approval.comment ? el("span", { class: "muted", text: ` “${approval.comment}”` }) : null,
      ];
    }
    const errorId = `approval-error-${stage.key}`;
    const comment = el("input", {
      "data-testid": `approval-comment-${stage.key}`,
      placeholder: "Comment (optional)",
      "aria-label": `Comment for ${stage.key}`,
      value: state.commentDrafts.get(approval.id) || "",
      oninput: (e) => state.commentDrafts.set(approval.id, e.target.value),
    });
    const error = el("p", { class: "error", "data-testid": errorId, role: "alert", hidden: true });
    const decide = (kind) => {
      const buttons = [...approvalButtons];
      return act(buttons, error, async () => {
        const input = { runId, stageKey: stage.key, comment: comment.value.trim() || null };
        await gql(kind === "approve" ? M.approve : M.reject, { input });
        state.commentDrafts.delete(approval.id);
        await refreshRun();
      });
    };
    const approvalButtons = [
      el("button", {
        type: "button",
        "data-testid": `approve-${stage.key}`,
        text: "Approve",
        onclick: () => decide("approve"),
      }),
      el("button", {
        type: "button",
        class: "danger",
        "data-testid": `reject-${stage.key}`,
        text: "Reject",
        onclick: () => decide("reject"),
      }),
    ];
    return [
      el(
        "div",
        {},
        el("strong", { text: "Approval pending" }),
        el("span", {
          class: "muted",
          text: ` · ${approval.reason || "gate"} · role ${approval.requiredRole} · ${approval.id}`,
        }),
      ),
      el("div", { class: "inline" }, comment, ...approvalButtons),
      error,
    ];
  }

  async function openArtifact(stageKey, path) {
    const runId = state.runId;
    await act(null, "#artifact-error", async () => {
      const d = await gql(Q.artifacts, { id: runId });
      if (state.runId !== runId) return;
      const stage = d.workflowRun && d.workflowRun.stages.find((s) => s.key === stageKey);
      const artifact = stage && stage.artifacts.find((a) => a.path === path);
      if (!artifact) throw new Error(`artifact ${path} not found`);
      $("#artifact-path").textContent = artifact.path;
      $("#artifact-meta").textContent =
        `${stageKey} · ${artifact.kind} · ${fmtSize(artifact.size)} · sha256 ${artifact.sha256.slice(0, 12)}`;
      $("#artifact-content").textContent = artifact.content;
      const viewer = $("#artifact-viewer");
      viewer.dataset.path = artifact.path;
      viewer.hidden = false;
    });
  }

  function closeArtifact() {
    const viewer = $("#artifact-viewer");
    viewer.hidden = true;
    delete viewer.dataset.path;
    $("#artifact-content").textContent = "";
  }

  async function cancelRun() {
    if (!state.runId) return;
    const d = await gql(M.cancel, { input: { runId: state.runId, reason: "canceled from the console" } });
    $("#run-action-note").textContent = `cancel: run is ${d.cancelWorkflowRun.run.status}`;
    await refreshRun();
  }

  async function resumeRun() {
    if (!state.runId) return;
    const d = await gql(M.resume, { input: { runId: state.runId } });
    const r = d.resumeWorkflowRun;
    $("#run-action-note").textContent = r.resumeApplied
      ? `resumed: run is ${r.run.status}`
      : `nothing to resume: run is ${r.run.status}`;
    await refreshRun();
  }

  // ------------------------------------------------------------------ wiring

  function onSubmit(form, button, errorTarget, fn) {
    $(form).addEventListener("submit", (e) => {
      e.preventDefault();
      act($(button), errorTarget, fn);
    });
  }

  function bind() {
    onSubmit("#brand-form", "#brand-create", "#brand-error", createBrand);
    onSubmit("#project-form", "#project-create", "#project-error", createProject);
    onSubmit("#thread-form", "#thread-create", "#thread-error", createThread);
    onSubmit("#mode-form", "#mode-add", "#mode-error", () => changeMode("add", $("#mode-add-select").value));
    onSubmit("#run-form", "#run-start", "#run-start-error", startRun);
    $("#brand-select").addEventListener("change", (e) =>
      act(null, "#brand-error", () => selectBrand(e.target.value)),
    );
    $("#project-select").addEventListener("change", (e) =>
      act(null, "#project-error", () => selectProject(e.target.value)),
    );
    $("#thread-select").addEventListener("change", (e) =>
      act(null, "#thread-error", () => selectThread(e.target.value)),
    );
    $("#run-mode").addEventListener("change", () => schedulePreview(0));
    // After the action, the run's status decides again whether these buttons are enabled.
    $("#run-cancel").addEventListener("click", (e) =>
      act(e.currentTarget, "#run-action-error", cancelRun).then(renderRunDetail),
    );
    $("#run-resume").addEventListener("click", (e) =>
      act(e.currentTarget, "#run-action-error", resumeRun).then(renderRunDetail),
    );
    $("#artifact-close").addEventListener("click", closeArtifact);
    window.addEventListener("unhandledrejection", (e) => showError("#global-error", e.reason));
    window.addEventListener("error", (e) => showError("#global-error", e.error || e.message));
  }

  async function boot() {
    bind();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    client = new SubscriptionClient(`${scheme}://${location.host}/graphql/ws`, setConnection);
    // A small hook for tests and for trying the reconnection by hand.
    window.vmConsole = {
      state,
      connectionLog: state.connectionLog,
      dropConnection: () => client.drop(),
    };
    try {
      await loadProfiles();
    } catch (err) {
      showError("#global-error", err);
    }
    const hint = readHash();
    try {
      if (hint.threadId) {
        const d = await gql(Q.threadRef, { id: hint.threadId });
        if (d.thread) {
          hint.brandId = d.thread.brandId;
          hint.projectId = d.thread.projectId;
        }
      }
      const brandId = await loadBrands(hint.brandId);
      await selectBrand(brandId, hint);
    } catch (err) {
      showError("#brand-error", err);
    }
  }

  boot();
})();

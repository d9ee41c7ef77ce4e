use crate::helpers::{Backend, TestApp};
use serde_json::json;

async fn creates_and_reads_the_workspace(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let d = app
        .data(
            "mutation { createBrand(input:{brandId:\"acme\", name:\"  Acme  \"}) { brand { id name } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        d["createBrand"]["brand"],
        json!({"id": "acme", "name": "Acme"})
    );
    let d = app
        .data(
            "mutation { createProject(input:{brandId:\"acme\", name:\"Launch\", objective:\"grow\", channels:[\"seo\",\"email\"], dueDate:\"2026-12-31\"}) {
                project { id brandId name objective channels dueDate } } }",
            json!({}),
        )
        .await;
    let project = &d["createProject"]["project"];
    let pid = project["id"].as_str().expect("id");
    assert!(pid.starts_with("p-"), "{pid}");
    assert_eq!(project["channels"], json!(["seo", "email"]));
    assert_eq!(project["dueDate"], "2026-12-31");
    let d = app
        .data(
            "mutation($p:ID!) { createThread(input:{projectId:$p, title:\"Q1\", modes:[\"plan_90d\"]}) { thread { id brandId projectId modes status } } }",
            json!({ "p": pid }),
        )
        .await;
    let thread = &d["createThread"]["thread"];
    let tid = thread["id"].as_str().expect("id").to_string();
    assert!(tid.starts_with("t-"));
    assert_eq!(
        thread["brandId"], "acme",
        "a thread's brand is its project's"
    );
    assert_eq!(thread["modes"], json!(["plan_90d"]));
    assert_eq!(thread["status"], "open");

    // Updates.
    app.data(
        "mutation { updateBrand(input:{brandId:\"acme\", name:\"Acme Inc\"}) { brand { name } } }",
        json!({}),
    )
    .await;
    let d = app
        .data(
            "mutation($p:ID!) { updateProject(input:{projectId:$p, objective:\"win\", dueDate:null}) { project { name objective dueDate } } }",
            json!({ "p": pid }),
        )
        .await;
    assert_eq!(
        d["updateProject"]["project"],
        json!({"name": "Launch", "objective": "win", "dueDate": null})
    );
    app.data(
        "mutation($t:ID!) { renameThread(input:{threadId:$t, title:\"Q2\"}) { thread { title } } }",
        json!({ "t": tid }),
    )
    .await;
    app.data("mutation($t:ID!) { addThreadMode(input:{threadId:$t, mode:\"content_calendar\"}) { thread { modes } } }", json!({ "t": tid })).await;
    let d = app
        .data("mutation($t:ID!) { removeThreadMode(input:{threadId:$t, mode:\"plan_90d\"}) { thread { modes title } } }", json!({ "t": tid }))
        .await;
    assert_eq!(
        d["removeThreadMode"]["thread"],
        json!({"modes": ["content_calendar"], "title": "Q2"})
    );

    // Reads and the timeline.
    let d = app
        .data(
            "query($t:ID!) { brands { edges { node { id name projects { edges { node { id threads { edges { node { id } } } } } } } } }
                             thread(id:$t) { title project { name } brand { name } timeline { edges { node { type actorId } } } } }",
            json!({ "t": tid }),
        )
        .await;
    assert_eq!(d["brands"]["edges"][0]["node"]["name"], "Acme Inc");
    assert_eq!(
        d["brands"]["edges"][0]["node"]["projects"]["edges"][0]["node"]["threads"]["edges"][0]
            ["node"]["id"],
        tid.as_str()
    );
    let types: Vec<_> = d["thread"]["timeline"]["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| e["node"]["type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            json!("ThreadCreated"),
            json!("ThreadRenamed"),
            json!("ThreadModeAdded"),
            json!("ThreadModeRemoved")
        ]
    );
    assert_eq!(
        d["thread"]["timeline"]["edges"][0]["node"]["actorId"],
        "ana"
    );
}

async fn paginates_with_cursors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for i in 0..5 {
        app.data(&format!("mutation {{ createBrand(input:{{brandId:\"b{i}\", name:\"B{i}\"}}) {{ brand {{ id }} }} }}"), json!({})).await;
    }
    let q = "query($a:String) { brands(first:2, after:$a) { pageInfo { hasNextPage endCursor } edges { node { id } } } }";
    let mut after = serde_json::Value::Null;
    let mut seen = Vec::new();
    loop {
        let d = app.data(q, json!({ "a": after })).await;
        for e in d["brands"]["edges"].as_array().expect("edges") {
            seen.push(e["node"]["id"].as_str().expect("id").to_string());
        }
        if !d["brands"]["pageInfo"]["hasNextPage"]
            .as_bool()
            .expect("bool")
        {
            break;
        }
        after = d["brands"]["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(seen, ["b0", "b1", "b2", "b3", "b4"]);
    assert_eq!(
        app.error_code(
            "{ brands(after:\"garbage\") { edges { cursor } } }",
            json!({})
        )
        .await,
        "VALIDATION"
    );
    assert_eq!(
        app.error_code("{ brands(first:1000) { edges { cursor } } }", json!({}))
            .await,
        "VALIDATION"
    );
}

async fn bad_input_gets_a_code_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let thread = app.thread().await;
    let head = app.head().await;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("mutation { createBrand(input:{name:\"\"}) { brand { id } } }", json!({}), "VALIDATION"),
        ("mutation { createBrand(input:{brandId:\"bad id!\", name:\"x\"}) { brand { id } } }", json!({}), "VALIDATION"),
        ("mutation { createBrand(input:{brandId:\"../etc\", name:\"x\"}) { brand { id } } }", json!({}), "VALIDATION"),
        ("mutation { createProject(input:{brandId:\"ghost\", name:\"x\"}) { project { id } } }", json!({}), "NOT_FOUND"),
        ("mutation { createThread(input:{projectId:\"ghost\", title:\"x\"}) { thread { id } } }", json!({}), "NOT_FOUND"),
        ("mutation { updateBrand(input:{brandId:\"ghost\", name:\"x\"}) { brand { id } } }", json!({}), "NOT_FOUND"),
        ("mutation { renameThread(input:{threadId:\"ghost\", title:\"x\"}) { thread { id } } }", json!({}), "NOT_FOUND"),
        ("mutation($t:ID!) { renameThread(input:{threadId:$t, title:\"   \"}) { thread { id } } }", json!({"t": thread}), "VALIDATION"),
        ("mutation($t:ID!) { addThreadMode(input:{threadId:$t, mode:\"no_such_mode\"}) { thread { id } } }", json!({"t": thread}), "VALIDATION"),
        ("mutation($t:ID!) { startWorkflowRun(input:{threadId:$t, requestText:\"\", mode:\"plan_90d\"}) { run { id } } }", json!({"t": thread}), "VALIDATION"),
        ("mutation($t:ID!) { startWorkflowRun(input:{threadId:$t, requestText:\"x\", mode:\"plan_90d\", skillOverrides:[{stageKey:\"strategy_draft\", skills:[\"a\"]}]}) { run { id } } }", json!({"t": thread}), "VALIDATION"),
        ("mutation($t:ID!) { startWorkflowRun(input:{threadId:$t, requestText:\"x\", mode:\"plan_90d\", skillOverrides:[{stageKey:\"research\", skills:[]}]}) { run { id } } }", json!({"t": thread}), "VALIDATION"),
        ("mutation { startWorkflowRun(input:{threadId:\"ghost\", requestText:\"x\", mode:\"plan_90d\"}) { run { id } } }", json!({}), "NOT_FOUND"),
        ("mutation { approveWorkflowRun(input:{runId:\"ghost\"}) { resumeApplied } }", json!({}), "NOT_FOUND"),
        ("mutation { completeTask(input:{taskId:\"ghost\"}) { task { id } } }", json!({}), "NOT_FOUND"),
        ("mutation { createProject(input:{brandId:\"x\", name:\"x\", dueDate:\"31/12/2026\"}) { project { id } } }", json!({}), "VALIDATION"),
        ("mutation($n:String!) { createBrand(input:{name:$n}) { brand { id } } }", json!({"n": "a\u{0}b"}), "VALIDATION"),
        ("mutation($t:ID!, $r:String!) { startWorkflowRun(input:{threadId:$t, requestText:$r, mode:\"plan_90d\"}) { run { id } } }", json!({"t": thread, "r": "x\u{0}"}), "VALIDATION"),
    ];
    for (q, vars, code) in cases {
        assert_eq!(app.error_code(q, vars).await, code, "{q}");
    }
    // Duplicate ids.
    let d = app
        .data(
            "mutation { createBrand(input:{brandId:\"dup\", name:\"x\"}) { brand { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(d["createBrand"]["brand"]["id"], "dup");
    let head = head + 1;
    assert_eq!(
        app.error_code(
            "mutation { createBrand(input:{brandId:\"dup\", name:\"y\"}) { brand { id } } }",
            json!({})
        )
        .await,
        "CONFLICT"
    );
    assert_eq!(app.head().await, head, "failed mutations appended events");
    let d = app.data("{ brand(id:\"dup\") { name } }", json!({})).await;
    assert_eq!(d["brand"]["name"], "x");
}

async fn idempotency_keys_replay_or_refuse(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let q = "mutation($n:String!, $k:String) { createBrand(input:{name:$n, idempotencyKey:$k}) { brand { id name } } }";
    let a = app.data(q, json!({"n": "Acme", "k": "key-1"})).await;
    let head = app.head().await;
    let b = app.data(q, json!({"n": "Acme", "k": "key-1"})).await;
    assert_eq!(a, b, "a replay answers the first answer");
    assert_eq!(app.head().await, head, "a replay appends nothing");
    assert_eq!(
        app.error_code(q, json!({"n": "Other", "k": "key-1"})).await,
        "IDEMPOTENCY_KEY_REUSED"
    );
    // Keys are scoped by mutation.
    let brand = a["createBrand"]["brand"]["id"].as_str().expect("id");
    app.data(
        "mutation($b:ID!) { createProject(input:{brandId:$b, name:\"P\", idempotencyKey:\"key-1\"}) { project { id } } }",
        json!({"b": brand}),
    )
    .await;
    assert_eq!(app.head().await, head + 1);
    // Without a key, two calls create two brands.
    app.data(q, json!({"n": "Acme", "k": null})).await;
    app.data(q, json!({"n": "Acme", "k": null})).await;
    assert_eq!(app.head().await, head + 3);
}

async fn profiles_and_preview(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let d = app
        .data(
            "{ workflowProfiles { version foundationMode forceFoundationFallback profiles { mode stages { key approvalRequired retryPolicy { maxAttempts backoffSeconds } timeoutSeconds } } }
               previewWorkflowRun(mode:\"content_calendar\", skillOverrides:[{stageKey:\"keywords\", skills:[\"x/y\"]}]) {
                 requestedMode effectiveMode fallbackApplied profileVersion profileDigest skillOverrides { stageKey skills } stages { key skills } } }",
            json!({}),
        )
        .await;
    let p = &d["workflowProfiles"];
    assert_eq!(p["version"], "v1");
    assert_eq!(p["foundationMode"], "foundation_stack");
    assert_eq!(p["forceFoundationFallback"], true);
    let modes: Vec<_> = p["profiles"]
        .as_array()
        .expect("profiles")
        .iter()
        .map(|p| p["mode"].clone())
        .collect();
    assert_eq!(
        modes,
        [
            json!("content_calendar"),
            json!("foundation_stack"),
            json!("plan_90d")
        ]
    );
    let plan = &d["previewWorkflowRun"];
    assert_eq!(plan["requestedMode"], "content_calendar");
    assert_eq!(plan["effectiveMode"], "foundation_stack");
    assert_eq!(plan["fallbackApplied"], true);
    assert_eq!(plan["profileVersion"], "v1");
    assert_eq!(plan["stages"].as_array().expect("stages").len(), 4);
    assert_eq!(plan["stages"][3]["skills"], json!(["x/y"]));
    assert_eq!(
        plan["skillOverrides"],
        json!([{"stageKey": "keywords", "skills": ["x/y"]}])
    );
    assert_eq!(
        app.error_code("{ previewWorkflowRun(mode:\"plan_90d\", skillOverrides:[{stageKey:\"nope\", skills:[\"a\"]}]) { effectiveMode } }", json!({})).await,
        "VALIDATION"
    );
    assert_eq!(
        app.error_code("{ previewWorkflowRun(mode:\"x\", skillOverrides:[{stageKey:\"research\", skills:[\" \"]}]) { effectiveMode } }", json!({})).await,
        "VALIDATION"
    );
}

crate::both_backends!(
    creates_and_reads_the_workspace,
    paginates_with_cursors,
    bad_input_gets_a_code_and_writes_nothing,
    idempotency_keys_replay_or_refuse,
    profiles_and_preview,
);

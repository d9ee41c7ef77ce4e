use crate::helpers::{Backend, TestApp};
use serde_json::{json, Value};

async fn health_and_graphiql(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for path in ["/healthz", "/api/v1/health"] {
        let r = app
            .client
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.json::<Value>().await.expect("json"),
            json!({"status": "ok"})
        );
    }
    let page = app
        .client
        .get(format!("{}/graphql", app.url))
        .send()
        .await
        .expect("get");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("graphiql") || html.contains("GraphiQL"));
    assert!(
        html.contains("/graphql/ws"),
        "GraphiQL is wired to the subscription endpoint"
    );
    let d = app.data("{ health { status database } }", json!({})).await;
    assert_eq!(d["health"]["status"], "ok");
    let expected = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(d["health"]["database"], expected);
}

async fn limits_protect_the_server(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Too deep.
    let mut q = String::from("{ brands { edges { node { projects { edges { node { threads { edges { node { project { brand { projects { edges { node { threads { edges { node { brand { name } } } } } } } } } } } } } } } } } } }");
    q.push(' ');
    let body = app.gql(&q, json!({})).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .expect("msg")
            .contains("nested too deep"),
        "{body}"
    );
    // Too large a body: refused from its declared length, before it is read.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = app.url.trim_start_matches("http://").to_string();
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = "POST /graphql HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n";
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 256];
        let n = stream.read(&mut buf).await.expect("read");
        let response = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    }
    // The GraphiQL introspection query passes the limits.
    let intro = app.gql(INTROSPECTION, json!({})).await;
    assert!(intro.get("errors").is_none(), "{intro}");
}

const INTROSPECTION: &str = "query IntrospectionQuery { __schema { queryType { name } mutationType { name } subscriptionType { name }
  types { ...FullType } directives { name description locations args { ...InputValue } } } }
fragment FullType on __Type { kind name description fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason }
  inputFields { ...InputValue } interfaces { ...TypeRef } enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason } possibleTypes { ...TypeRef } }
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } }";

/// POST a document with an operation name.
async fn named(app: &TestApp, query: &str, operation: &str) -> Value {
    app.post_body(&json!({ "query": query, "operationName": operation }))
        .await
}

/// A text parsed once is not parsed again: later requests with it get a copy of its document,
/// and still get their own variables and operation, and the depth limit and validation.
async fn documents_are_parsed_once_per_text(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let docs = app.documents.clone().expect("a spawned app");
    let hits = || docs.hits();
    let before = hits();

    // One text, two operations: each request runs the one it names.
    let two = "query A { health { status } } query B { health { database } }";
    let a = named(&app, two, "A").await;
    assert_eq!(a, json!({"data": {"health": {"status": "ok"}}}), "{a}");
    let b = named(&app, two, "B").await;
    assert!(b["data"]["health"]["database"].is_string(), "{b}");
    assert!(b["data"]["health"].get("status").is_none(), "{b}");
    assert_eq!(hits() - before, 1, "the second request reused the document");

    // Variables are the request's own.
    let create = "mutation($n:String!) { createBrand(input:{name:$n}) { brand { name } } }";
    for name in ["First", "Second", "Third"] {
        let d = app.data(create, json!({ "n": name })).await;
        assert_eq!(d["createBrand"]["brand"]["name"], name);
    }
    assert_eq!(hits() - before, 3);

    // A text that does not parse is not kept: the same syntax error each time.
    let broken = "{ health { status ";
    let first = app.gql(broken, json!({})).await;
    let again = app.gql(broken, json!({})).await;
    assert!(first["errors"][0]["message"].is_string(), "{first}");
    assert_eq!(first, again);
    assert_eq!(hits() - before, 3);

    // A kept document is still checked: validation and the depth limit apply every time.
    let unknown = "{ health { nope } }";
    for _ in 0..2 {
        let body = app.gql(unknown, json!({})).await;
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("nope")),
            "{body}"
        );
        assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    }
    let deep = "{ brands { edges { node { projects { edges { node { threads { edges { node { project { brand { projects { edges { node { threads { edges { node { brand { name } } } } } } } } } } } } } } } } } } }";
    for _ in 0..2 {
        let body = app.gql(deep, json!({})).await;
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("nested too deep")),
            "{body}"
        );
    }
    assert_eq!(hits() - before, 5);
}

crate::both_backends!(
    health_and_graphiql,
    limits_protect_the_server,
    documents_are_parsed_once_per_text
);

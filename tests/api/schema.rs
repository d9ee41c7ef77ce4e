/// `schema.graphql` must be the SDL the code exports (`cargo run -- export-schema -o schema.graphql`).
#[test]
fn schema_file_matches_the_code() {
    let exported = vm_workflow::graphql::export_sdl();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let on_disk = std::fs::read_to_string(&path).expect("schema.graphql exists");
    assert!(
        exported == on_disk,
        "schema.graphql is stale: run `cargo run -- export-schema -o schema.graphql`"
    );
}

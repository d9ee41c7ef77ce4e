# Sourced by benches/starts.sh and benches/starts-callgrind.sh: a thread to start runs on, and
# the request body of one start.

# Create a brand, a project and a thread on the server whose GraphQL endpoint is $1; print the
# thread's id.
make_thread() {
  local gql=$1 brand project
  call() { curl -sf "$gql" -H 'content-type: application/json' -d "$1"; }
  id_of() { grep -o "\"id\":\"$1-[0-9a-f]*\"" | cut -d'"' -f4; }
  brand=$(call '{"query":"mutation { createBrand(input: {name: \"starts\"}) { brand { id } } }"}' | id_of b)
  project=$(call "{\"query\":\"mutation { createProject(input: {brandId: \\\"$brand\\\", name: \\\"starts\\\"}) { project { id } } }\"}" | id_of p)
  call "{\"query\":\"mutation { createThread(input: {projectId: \\\"$project\\\", title: \\\"starts\\\"}) { thread { id } } }\"}" | id_of t
}

# The JSON body of a `startWorkflowRun` on thread $1 (mode content_calendar).
start_body() {
  printf '%s' "{\"query\":\"mutation(\$i: StartWorkflowRunInput!) { startWorkflowRun(input: \$i) { run { id status } } }\",\"variables\":{\"i\":{\"threadId\":\"$1\",\"mode\":\"content_calendar\",\"requestText\":\"Load test run: CRM for clinics\"}}}"
}

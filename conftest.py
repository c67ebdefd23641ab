# Root conftest: the suite lives in tests/; example projects and benchmarks are run by their own tests.
collect_ignore_glob = ["examples/*", "benchmarks/*", "build/*", "tools/*"]

"""The test suite. A package so that its shared helpers import by their full name,
`tests.support.<module>`, under pytest and from `python -m benchmarks.<name>` alike."""

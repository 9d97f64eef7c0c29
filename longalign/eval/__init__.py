"""Stage 4: candidates (local or served), prompts, prediction keys, the judge, and the two suites."""

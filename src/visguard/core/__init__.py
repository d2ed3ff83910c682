"""The core types and limits: errors, requests and verdicts, policy, taxonomy, the image boundary, paths, redaction.

Depends on nothing else in visguard."""

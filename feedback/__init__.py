"""What lives in Redis about completions and feedback.

- `feedback.records`: CompletionRecord, ResponseRecord, FeedbackRecord, new_id
- `feedback.store`: FeedbackStore (async, for the server): log completions, submit feedback
- `feedback.export`: export_snapshot, feedback_since (sync, for training and the CLI)
- `feedback.config`: StoreConfig; `feedback.errors`: the errors and their gRPC codes
- `feedback.keys`: the key layout

This package imports neither `serving` nor `training`; importing it loads nothing heavy.
"""

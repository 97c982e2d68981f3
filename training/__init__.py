"""GRank model, training loop, evaluation and the publish gate (docs/model.md)."""

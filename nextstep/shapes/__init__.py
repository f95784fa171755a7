"""The synthetic shapes world: scenes (drawing and sampling), synth (training shards), prompts, score (the
exact scorer) and evaluate (`nextstep eval shapes`)."""

"""cpm2 engine: the encoder-decoder MoE model, its weights, tokenizer and generation."""

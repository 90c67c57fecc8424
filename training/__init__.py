"""cpm2 training jobs: span-corruption pretraining, knowledge inheritance, upcycling, prompt tuning."""

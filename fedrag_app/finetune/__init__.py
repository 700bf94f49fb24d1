"""Fine-tuning methods: RALT/RAFT for the generator, LSR for the retriever, one shared loop."""

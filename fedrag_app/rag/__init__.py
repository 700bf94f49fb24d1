"""The RAG system: knowledge store, retriever, generator. Nothing here knows about Flower."""

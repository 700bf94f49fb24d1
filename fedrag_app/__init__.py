"""fedrag-app: fine-tune RAG systems (retriever + generator) centrally or with Flower."""

__version__ = "0.1.0"

"""MT Photos' AI API (the protocol of MT Photos' own mt-photos-ai service), answered from cnai's model pool."""

"""Lightning callbacks for KR models, importable as ``lightning_kr.callbacks``."""

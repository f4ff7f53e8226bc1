"""An OpenAI-compatible HTTP server over wde engines: `wde serve`."""

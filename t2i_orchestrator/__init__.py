"""``t2i-orchestrator``: a text-to-image node serving diffusers models over the Livepeer AI API."""

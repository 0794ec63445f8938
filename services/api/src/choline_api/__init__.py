"""choline api service: The gateway: REST/OpenAPI, auth, web UI, webhooks; the CLI and browser talk only to it."""

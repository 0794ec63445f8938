"""choline deploy service: Serves model bundles as HTTP APIs; owns deployments."""

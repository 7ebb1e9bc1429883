"""Generation backends: one interface (`base.Backend`), chosen per model in the spec."""

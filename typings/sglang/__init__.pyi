# Stubs for the part of sglang 0.5.23 that tileprefill.integrations.sglang uses. Keep them to that.

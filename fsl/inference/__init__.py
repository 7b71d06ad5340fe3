"""Split inference across device, edge and cloud: multi-exit models, profiles, a latency-aware
scheduler, batching under a latency target, data-cartography routing and stage provisioning."""

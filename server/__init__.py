"""The server role: the split server (server segment) and the Flower ServerApp."""

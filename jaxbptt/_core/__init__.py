"""The call: options checked and resolved once, the methods that compute gradients, the public entry points."""

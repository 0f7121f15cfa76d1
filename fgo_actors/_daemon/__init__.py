"""``fgo serve`` and the embedded streaming optimizer: the actor loops, the HTTP
API, the serve command's settings, and the asyncio bridge."""

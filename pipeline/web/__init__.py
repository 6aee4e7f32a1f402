"""The monitoring web app: every stream's picture, caption, state and events in a browser.

It reads and writes Redis only, through the contract (`connectors.redis_schema`) and
`connectors.client.SlowFastClient`, so it can watch a pipeline running on another machine.
"""

"""Pure rendering: a validated DMZ in, lxml elements and nft JSON out.

Nothing here touches the host; the same input always gives the same bytes.
"""

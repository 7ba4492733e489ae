"""OAuth tokens: access tokens renewed from refresh tokens (`sources`), Microsoft's rotated
refresh token kept where it came from (`store`), and the consent flows that issue a refresh
token in the first place (`consent`, for `auth gmail` and `auth microsoft`)."""

module kiln.local/pause

go 1.24

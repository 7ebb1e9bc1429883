"""The recipe's stages: plug-ins behind charbuild.contract.Stage, one module per concept."""

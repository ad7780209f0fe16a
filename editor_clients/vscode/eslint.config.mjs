import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["out/**", "node_modules/**"] },
  ...tseslint.configs.recommended,
  {
    rules: {
      eqeqeq: "error",
      curly: "error",
      "@typescript-eslint/no-floating-promises": "off",
    },
  },
);
